"""A private Dovecot POP3 server on free loopback ports, for tests.

Usage::

    server = DovecotServer()
    server.start()
    server.reset_mailbox("alice")   # the STANDARD_MESSAGES, UIDLs stable
    ...
    server.stop()

Dovecot's login process refuses to run as root, so the instance uses the
``dovecot``/``dovenull`` users the Debian package creates; its folder comes
from ``tempfile.mkdtemp()`` (mode 0711) because pytest's ``tmp_path`` has a
0700 parent that those users cannot traverse.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

HOST = "127.0.0.1"

#: Test accounts: user name -> password (alice's has a space in it).
USERS: dict[str, str] = {
    "alice": "alice-secret-pw 1",
    "bob": "b0b-Pa55",
}


#: The instance every test shares; its CAPA is asserted on, so a SCRAM instance is separate.
DEFAULT_MECHANISMS = "plain login cram-md5 apop"
#: Dovecot 2.3 computes SCRAM from the plaintext passwords of the passwd-file.
SCRAM_MECHANISMS = "plain scram-sha-1 scram-sha-256"


def _crlf(text: str) -> bytes:
    """Join lines of ``text`` with CRLF; the result ends with CRLF."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return "".join(line + "\r\n" for line in lines).encode("ascii")


MSG_PLAIN = _crlf(
    """From: Carol Sender <carol@example.org>
To: Alice <alice@example.com>
Subject: Hello from the popproxy tests
Date: Mon, 01 Jan 2024 10:00:00 +0000
Message-ID: <plain-0001@popproxy.test>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Hi Alice,

this is a small plain text message.
See you soon.
"""
)

MSG_DOTS = _crlf(
    """From: Dot Tester <dots@example.org>
To: Alice <alice@example.com>
Subject: Lines that need dot-stuffing
Date: Mon, 01 Jan 2024 10:05:00 +0000
Message-ID: <dots-0002@popproxy.test>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

The next lines start with dots or look like status lines.
.
.single dot at the start
..two dots at the start
...
+OK not a status
-ERR neither
. trailing text after a lone dot
Last line.
"""
)

_PDF_BYTES = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
    + bytes(range(256)) * 12
    + b"\n%%EOF\n"
)
_PDF_B64 = base64.encodebytes(_PDF_BYTES).decode("ascii")  # 76-char lines

MSG_MULTIPART = _crlf(
    """From: Reports <reports@example.org>
To: Alice <alice@example.com>
Subject: Monthly report (with attachment)
Date: Mon, 01 Jan 2024 10:10:00 +0000
Message-ID: <multipart-0003@popproxy.test>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_popproxy_boundary_42"

This is a multi-part message in MIME format.

--=_popproxy_boundary_42
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 7bit

Please find the report attached.

--=_popproxy_boundary_42
Content-Type: application/pdf; name="report.pdf"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="report.pdf"

"""
    + _PDF_B64
    + """
--=_popproxy_boundary_42--
"""
)


def _big_message() -> bytes:
    head = _crlf(
        """From: Bulk Sender <bulk@example.org>
To: Alice <alice@example.com>
Subject: A large message with long lines
Date: Mon, 01 Jan 2024 10:15:00 +0000
Message-ID: <big-0004@popproxy.test>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

"""
    )
    lines = []
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for i in range(205):
        prefix = f"line {i:04d} "
        body = (alphabet * 20)[i % len(alphabet) :]
        # 998 characters + CRLF = 1000 bytes per line (the RFC 5322 limit).
        lines.append((prefix + body)[:998].encode("ascii") + b"\r\n")
    return head + b"".join(lines)


MSG_BIG = _big_message()

#: The messages every mailbox holds after ``reset_mailbox``, in POP3 order
#: (message 1 is ``STANDARD_MESSAGES[0]``). Exact bytes, CRLF line ends.
STANDARD_MESSAGES: tuple[bytes, ...] = (MSG_PLAIN, MSG_DOTS, MSG_MULTIPART, MSG_BIG)

_BASE_TIME = 1704103200  # 2024-01-01 10:00:00 UTC: file names and mtimes


def maildir_name(index: int) -> str:
    """The Maildir file name (and so the UIDL) of the ``index``-th message (1-based)."""
    return f"{_BASE_TIME + index}.M{index:06d}P1.popproxy"


def standard_uidls() -> list[str]:
    """The UIDLs of ``STANDARD_MESSAGES`` right after ``reset_mailbox``."""
    return [maildir_name(i) for i in range(1, len(STANDARD_MESSAGES) + 1)]


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_dovecot() -> str | None:
    """Path of the ``dovecot`` binary, looking in /usr/sbin too."""
    found = shutil.which("dovecot")
    if found:
        return found
    for candidate in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


_CONF_TEMPLATE = """\
# Written by tests/support/dovecot.py: a private test instance.
protocols = pop3
listen = {host}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
ssl = yes
ssl_cert = <{dir}/cert.pem
ssl_key = <{dir}/key.pem
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
mail_location = maildir:{dir}/mail/%u/Maildir
default_internal_user = dovecot
default_login_user = dovenull
default_internal_group = dovecot
first_valid_uid = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={dir}/mail/%u
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {port}
  }}
  inet_listener pop3s {{
    port = {pop3s_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
  # No auth penalty: after a failed login Dovecot would otherwise hold the
  # next login from 127.0.0.1 for seconds.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  chroot =
}}
protocol pop3 {{
  # The Maildir base file name: deterministic, since we name the files.
  pop3_uidl_format = %f
}}
"""


class DovecotError(RuntimeError):
    pass


def _descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _is_dovecot(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"dovecot" in f.read()
    except OSError:
        return False


class DovecotServer:
    """One private Dovecot instance (pop3 + pop3s) on free loopback ports."""

    def __init__(
        self, users: dict[str, str] | None = None, *, mechanisms: str = DEFAULT_MECHANISMS
    ) -> None:
        """``mechanisms``: Dovecot's ``auth_mechanisms`` (SCRAM_MECHANISMS for mpop's SCRAM)."""
        self.mechanisms = mechanisms
        self.binary = find_dovecot()
        self.host = HOST
        self.users: dict[str, str] = dict(users if users is not None else USERS)
        self.dir = Path(tempfile.mkdtemp(prefix="popproxy-dovecot-"))
        os.chmod(self.dir, 0o711)
        self.port = free_port()
        self.pop3s_port = free_port()
        while self.pop3s_port == self.port:
            self.pop3s_port = free_port()
        self.conf = self.dir / "dovecot.conf"
        self.log = self.dir / "dovecot.log"
        self.cafile = str(self.dir / "ca.pem")
        self._proc: subprocess.Popen[bytes] | None = None
        self._uid = pwd.getpwnam("dovecot").pw_uid
        self._gid = grp.getgrnam("dovecot").gr_gid
        self._write_files()

    # -- setup -------------------------------------------------------------

    def _write_files(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
        ca.cert_pem.write_to_path(self.cafile)
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        with open(self.dir / "cert.pem", "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        os.chmod(self.dir / "key.pem", 0o600)
        (self.dir / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}{pw}\n" for user, pw in self.users.items())
        )
        os.chmod(self.dir / "passwd", 0o644)
        self.conf.write_text(
            _CONF_TEMPLATE.format(
                host=self.host,
                dir=self.dir,
                port=self.port,
                pop3s_port=self.pop3s_port,
                mechanisms=self.mechanisms,
            )
        )
        os.chmod(self.conf, 0o644)
        for sub in ("run", "state"):
            (self.dir / sub).mkdir(mode=0o755, exist_ok=True)
        mail = self.dir / "mail"
        mail.mkdir(mode=0o755, exist_ok=True)
        for user in self.users:
            self.reset_mailbox(user)

    def _home(self, user: str) -> Path:
        if user not in self.users:
            raise KeyError(f"unknown test user {user!r}")
        return self.dir / "mail" / user

    def _chown_tree(self, top: Path) -> None:
        os.chown(top, self._uid, self._gid)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self._uid, self._gid)

    # -- mailboxes ---------------------------------------------------------

    def reset_mailbox(self, user: str, messages: tuple[bytes, ...] | None = None) -> None:
        """Rewrite ``user``'s Maildir with ``messages`` (default: STANDARD_MESSAGES).

        Dovecot's index and uidlist files go too; UIDLs are the Maildir file
        names, so they are the same after every reset (see ``standard_uidls``).
        """
        home = self._home(user)
        if home.exists():
            shutil.rmtree(home)
        maildir = home / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True, mode=0o700)
        home.chmod(0o700)
        for index, data in enumerate(STANDARD_MESSAGES if messages is None else messages, start=1):
            self._write_message(maildir, index, data)
        self._chown_tree(home)

    def add_message(self, user: str, data: bytes) -> int:
        """Append a message (exact bytes) to ``user``'s Maildir; returns its index."""
        maildir = self._home(user) / "Maildir"
        taken = [
            int(name.split(".", 1)[0]) - _BASE_TIME
            for sub in ("new", "cur")
            for name in os.listdir(maildir / sub)
            if name.endswith(".popproxy") or ".popproxy:" in name
        ]
        index = max(taken, default=0) + 1
        path = self._write_message(maildir, index, data)
        os.chown(path, self._uid, self._gid)
        return index

    def _write_message(self, maildir: Path, index: int, data: bytes) -> Path:
        name = maildir_name(index)
        tmp = maildir / "tmp" / name
        tmp.write_bytes(data)
        stamp = _BASE_TIME + index
        os.utime(tmp, (stamp, stamp))
        final = maildir / "new" / name
        os.rename(tmp, final)
        return final

    # -- process -----------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no dovecot log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 15.0) -> None:
        if self.binary is None:
            raise DovecotError("dovecot is not installed (apt-get install dovecot-pop3d)")
        if self._proc is not None:
            return
        check = subprocess.run(
            [self.binary, "-c", str(self.conf), "-n"], capture_output=True, timeout=30
        )
        if check.returncode != 0:
            raise DovecotError(
                f"dovecot rejected its config {self.conf}:\n"
                + check.stderr.decode(errors="replace")
            )
        self._proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        pending = {self.port, self.pop3s_port}
        while pending:
            if self._proc.poll() is not None:
                out = self._proc.stdout.read() if self._proc.stdout else b""
                self._proc = None
                raise DovecotError(
                    "dovecot exited at start:\n"
                    + out.decode(errors="replace")
                    + "\n--- log tail ---\n"
                    + self.log_tail()
                )
            for port in list(pending):
                try:
                    with socket.create_connection((self.host, port), timeout=1) as sock:
                        if port == self.port:
                            # Our Dovecot greets; a program that grabbed the free port
                            # between our pick and Dovecot's bind does not.
                            sock.settimeout(5)
                            if not sock.recv(64).startswith(b"+OK"):
                                self.stop()
                                raise DovecotError(f"port {port} is held by another program")
                        pending.discard(port)
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                self.stop()
                raise DovecotError(
                    f"dovecot did not open ports {sorted(pending)} within {timeout}s"
                    + "\n--- log tail ---\n"
                    + self.log_tail()
                )
            if pending:
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the master (it takes its children down) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        children = _descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        # The children (log, config, anvil, logins, pop3) exit with the master;
        # make sure none is left behind.
        deadline = time.monotonic() + 3
        while children and time.monotonic() < deadline:
            children = [pid for pid in children if _is_dovecot(pid)]
            if children:
                time.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
