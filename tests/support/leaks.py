"""Leak checks: a secret, in plain text or base64 at any alignment, must appear in no output."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

PASSWORD = b"Tr0ub4dor&3-horse"
TOKEN = b"ya29.a0AfH6SMBx-secret-token-42"
USER = b"alice"
TIMESTAMP = b"<1896.697170952@dbc.mtview.ca.us>"
CRAM_CHALLENGE = b"<4242.1700000000@pop.example.org>"


def base64_cores(secret: bytes) -> list[bytes]:
    """The part of base64(x + secret + y) that depends on ``secret`` alone, for |x| = 0, 1, 2.

    Found by encoding with two different surroundings and keeping the characters that agree
    (an independent construction from the one in popproxy).
    """
    cores = []
    for skew in range(3):
        one = base64.b64encode(b"\x00" * skew + secret + b"\x00\x00\x00")
        two = base64.b64encode(b"\xff" * skew + secret + b"\xff\xff\xff")
        same = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a == b]
        cores.append(one[same[0] : same[-1] + 1])
    return cores


def leak_forms(secret: bytes) -> list[bytes]:
    """The secret itself, each case of it, and its base64 at the three alignments."""
    return [secret, secret.lower(), secret.upper(), *base64_cores(secret)]


def find_leaks(outputs: Mapping[str, bytes | str], secrets: list[bytes]) -> list[str]:
    """Every (output, form) pair where a form of a secret occurs."""
    found = []
    for name, blob in outputs.items():
        data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
        for secret in secrets:
            for form in leak_forms(secret):
                if form in data:
                    found.append(f"{name}: {form!r}")
    return found


def assert_no_leak(outputs: Mapping[str, bytes | str], secrets: list[bytes]) -> None:
    leaks = find_leaks(outputs, secrets)
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def apop_digest(password: bytes = PASSWORD) -> bytes:
    return hashlib.md5(TIMESTAMP + password).hexdigest().encode()  # RFC 1939 §7


def cram_digest(password: bytes = PASSWORD) -> bytes:
    return hmac.new(password, CRAM_CHALLENGE, "md5").hexdigest().encode()  # RFC 2195 §2


def echo_line(secret: bytes) -> bytes:
    """A hostile server's reply that echoes ``secret`` plainly and base64 at every skew."""
    encoded = b" ".join(b64(b"x" * skew + secret + b"!") for skew in range(3))
    return b"-ERR [AUTH] rejected " + secret + b" (" + encoded + b")\r\n"


@dataclass
class Login:
    """One way of logging in: the client's lines, the server's answers, what must not leak."""

    name: str
    steps: list[tuple[str, bytes]]
    secrets: list[bytes] = field(default_factory=list)


GREETING = b"+OK POP3 ready " + TIMESTAMP + b"\r\n"
XOAUTH2 = b64(b"user=" + USER + b"\x01auth=Bearer " + TOKEN + b"\x01\x01")
OAUTHBEARER = b64(
    b"n,a=" + USER + b",\x01host=pop.example.org\x01port=110\x01auth=Bearer " + TOKEN + b"\x01\x01"
)
PLAIN = b64(b"\x00" + USER + b"\x00" + PASSWORD)
# RFC 5802 §5: the client proof and the server signature are password verifiers.
SCRAM_PROOF = b"dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
SCRAM_SIGNATURE = b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
SCRAM_NONCE = b"rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SCRAM_FIRST = b64(b"n,," + b"n=" + USER + b",r=rOprNGfwEbeRWgbNEkqO")
SCRAM_SERVER_FIRST = b64(b"r=" + SCRAM_NONCE + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
SCRAM_FINAL = b64(b"c=biws,r=" + SCRAM_NONCE + b",p=" + SCRAM_PROOF)
SCRAM_SERVER_FINAL = b64(b"v=" + SCRAM_SIGNATURE)
OAUTH_ERROR = b64(b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}')


def _user_pass(name: str, sep: bytes, verb: bytes = b"PASS") -> Login:
    return Login(
        name,
        [
            ("s", GREETING),
            ("c", b"USER " + USER + b"\r\n"),
            ("s", b"+OK\r\n"),
            ("c", verb + sep + PASSWORD + b"\r\n"),
            ("s", echo_line(PASSWORD)),
        ],
        [PASSWORD],
    )


def _sasl(name: str, first: bytes, exchange: list[tuple[str, bytes]], secret: bytes) -> Login:
    return Login(
        name,
        [("s", GREETING), ("c", first), *exchange, ("s", echo_line(secret))],
        [secret],
    )


LOGINS: list[Login] = [
    _user_pass("pass-sp", b" "),
    _user_pass("pass-spaces", b"   "),
    _user_pass("pass-tab", b"\t"),
    _user_pass("pass-tabs-lower", b"\t \t", b"pass"),
    Login(
        "apop",
        [
            ("s", GREETING),
            ("c", b"APOP " + USER + b" " + apop_digest() + b"\r\n"),
            ("s", echo_line(apop_digest())),
        ],
        [apop_digest()],
    ),
    Login(
        "apop-tab",
        [
            ("s", GREETING),
            ("c", b"apop\t" + USER + b"\t" + apop_digest() + b"\r\n"),
            ("s", echo_line(apop_digest())),
        ],
        [apop_digest()],
    ),
    _sasl("plain-ir", b"AUTH PLAIN " + PLAIN + b"\r\n", [], PASSWORD),
    _sasl("plain-ir-tab", b"AUTH\tPLAIN\t" + PLAIN + b"\r\n", [], PASSWORD),
    _sasl(
        "plain",
        b"AUTH PLAIN\r\n",
        [("s", b"+ \r\n"), ("c", PLAIN + b"\r\n")],
        PASSWORD,
    ),
    _sasl(
        "login",
        b"AUTH LOGIN\r\n",
        [
            ("s", b"+ " + b64(b"Username:") + b"\r\n"),
            ("c", b64(USER) + b"\r\n"),
            ("s", b"+ " + b64(b"Password:") + b"\r\n"),
            ("c", b64(PASSWORD) + b"\r\n"),
        ],
        PASSWORD,
    ),
    _sasl(
        "cram-md5",
        b"AUTH CRAM-MD5\r\n",
        [
            ("s", b"+ " + b64(CRAM_CHALLENGE) + b"\r\n"),
            ("c", b64(USER + b" " + cram_digest()) + b"\r\n"),
        ],
        cram_digest(),
    ),
    _sasl(
        "login-echoed-in-challenge",
        b"AUTH LOGIN\r\n",
        [
            ("s", b"+ " + b64(b"Username:") + b"\r\n"),
            ("c", b64(USER) + b"\r\n"),
            ("s", b"+ " + b64(b"Password:") + b"\r\n"),
            ("c", b64(PASSWORD) + b"\r\n"),
            ("s", b"+ " + b64(b"you typed " + PASSWORD + b", really?") + b"\r\n"),
            ("c", b"*\r\n"),
        ],
        PASSWORD,
    ),
    _sasl("xoauth2", b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n", [], TOKEN),
    _sasl(
        "xoauth2-challenge",
        b"AUTH XOAUTH2\r\n",
        [("s", b"+ \r\n"), ("c", XOAUTH2 + b"\r\n")],
        TOKEN,
    ),
    _sasl("oauthbearer", b"AUTH OAUTHBEARER " + OAUTHBEARER + b"\r\n", [], TOKEN),
    _sasl(
        "oauthbearer-error",
        b"AUTH OAUTHBEARER\r\n",
        [
            ("s", b"+ \r\n"),
            ("c", OAUTHBEARER + b"\r\n"),
            ("s", b"+ " + OAUTH_ERROR + b"\r\n"),
            ("c", b"AQ==\r\n"),
        ],
        TOKEN,
    ),
    _sasl(
        "xoauth2-error",
        b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n",
        [("s", b"+ " + OAUTH_ERROR + b"\r\n"), ("c", b"\r\n")],
        TOKEN,
    ),
    Login(
        "scram-sha-256",
        [
            ("s", GREETING),
            ("c", b"AUTH SCRAM-SHA-256 " + SCRAM_FIRST + b"\r\n"),
            ("s", b"+ " + SCRAM_SERVER_FIRST + b"\r\n"),
            ("c", SCRAM_FINAL + b"\r\n"),
            ("s", b"+ " + SCRAM_SERVER_FINAL + b"\r\n"),
            ("c", b"\r\n"),
            ("s", echo_line(SCRAM_PROOF)),
        ],
        [SCRAM_PROOF, SCRAM_SIGNATURE],
    ),
]


def session_steps(login: Login, *, pipelined: int = 0) -> list[tuple[str, bytes]]:
    """The login, optionally after ``pipelined`` unanswered NOOPs, then a short session."""
    steps = list(login.steps)
    if pipelined:
        steps.insert(1, ("c", b"NOOP\r\n" * pipelined))
    return [
        *steps,
        ("c", b"STAT\r\n"),
        ("s", b"+OK 0 0\r\n"),
        ("c", b"QUIT\r\n"),
        ("s", b"+OK bye\r\n"),
    ]
