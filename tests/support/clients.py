"""Drive real POP3 clients and return results that tests can compare.

Every helper is synchronous (call it from trio with ``trio.to_thread.run_sync``)
and bounded by a timeout, so a stuck proxy fails a test instead of hanging it.

- ``poplib_session``: Python's poplib (USER/PASS or APOP; plain, STLS, implicit TLS).
- ``curl_fetch``: curl's pop3:// / pop3s:// (SASL PLAIN, LOGIN, CRAM-MD5).
- ``fetchmail_fetch``: fetchmail 6.4 delivering through an MDA into a file.
- ``getmail_fetch``: getmail6 delivering through an external MDA, one file a message.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import shlex
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any, Literal

TLSMode = Literal["stls", "implicit"] | None

DEFAULT_TIMEOUT = 30.0


class ClientError(RuntimeError):
    """A client program failed; the message carries its output."""


def _ssl_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


def _join(lines: list[bytes]) -> bytes:
    """poplib's lines (CRLF stripped, dot-unstuffed) back to message bytes."""
    return b"".join(line + b"\r\n" for line in lines)


def poplib_session(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    apop: bool = False,
    tls: TLSMode = None,
    cafile: str | None = None,
    retrieve: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """CAPA, login (USER/PASS or APOP), STAT, LIST, UIDL, TOP 1 0, RETR each, QUIT.

    Returns a dict with:
      ``welcome`` (bytes), ``capa`` (dict as poplib parses it), ``stat``
      ((count, size)), ``list`` (list of bytes lines like b"1 320"), ``uidl``
      (list of bytes lines like b"1 <uid>"), ``top`` (bytes of TOP 1 0, or
      None for an empty mailbox), ``messages`` (list of bytes, one per message;
      each is poplib's lines joined with CRLF plus a final CRLF, so it equals
      the exact stored message when that ends in CRLF), ``quit`` (bytes).
    With ``tls="stls"`` the session upgrades right after the greeting (before
    CAPA), so the CAPA result is the post-TLS one.
    """
    client: poplib.POP3
    if tls == "implicit":
        client = poplib.POP3_SSL(host, port, timeout=timeout, context=_ssl_context(cafile))
    else:
        client = poplib.POP3(host, port, timeout=timeout)
    try:
        result: dict[str, Any] = {"welcome": client.getwelcome()}
        if tls == "stls":
            client.stls(context=_ssl_context(cafile))
        result["capa"] = client.capa()
        if apop:
            client.apop(user, password)
        else:
            client.user(user)
            client.pass_(password)
        result["stat"] = client.stat()
        result["list"] = client.list()[1]
        result["uidl"] = client.uidl()[1]
        count = result["stat"][0]
        result["top"] = _join(client.top(1, 0)[1]) if count else None
        result["messages"] = (
            [_join(client.retr(i)[1]) for i in range(1, count + 1)] if retrieve else []
        )
        result["quit"] = client.quit()
        return result
    except BaseException:
        with contextlib.suppress(Exception):
            client.close()
        raise


def _run(
    argv: list[str],
    *,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    if shutil.which(argv[0]) is None:
        raise ClientError(f"{argv[0]} is not installed (scripts/test installs it)")
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(
            f"{what} timed out after {timeout}s: {shlex.join(argv)}\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}"
        ) from exc
    if proc.returncode not in ok_codes:
        raise ClientError(
            f"{what} failed with exit code {proc.returncode}: {shlex.join(argv)}\n"
            f"stdout:\n{proc.stdout.decode(errors='replace')}\n"
            f"stderr:\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def curl_fetch(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    mech: Literal["PLAIN", "LOGIN", "CRAM-MD5"] | None = None,
    msg: int | None = None,
    tls: TLSMode = None,
    cafile: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """curl's pop3 client: the listing (``msg=None``) or message ``msg``; returns stdout.

    Without ``mech`` curl picks on its own (SASL first). ``tls="stls"`` adds
    ``--ssl-reqd``; ``tls="implicit"`` uses pop3s://. curl removes the
    terminating "." line and undoes dot-stuffing, so a message comes back as
    stored. Raises ClientError (with stderr) on failure.
    """
    scheme = "pop3s" if tls == "implicit" else "pop3"
    url = f"{scheme}://{host}:{port}/" + ("" if msg is None else str(msg))
    argv = [
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        str(timeout),
        "--user",
        f"{user}:{password}",
    ]
    if mech is not None:
        argv += ["--login-options", f"AUTH={mech}"]
    if tls == "stls":
        argv.append("--ssl-reqd")
    if cafile is not None:
        argv += ["--cacert", cafile]
    argv.append(url)
    return _run(argv, timeout=timeout + 5, what="curl").stdout


def fetchmail_fetch(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    tls: TLSMode = None,
    cafile: str | None = None,
    workdir: str | os.PathLike[str],
    auth: str | None = None,
    keep: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """fetchmail (keep, fetchall) delivering each message with ``cat >> OUT``.

    ``keep=False``: fetchmail deletes each message it delivered (``nokeep``).

    Returns OUT's bytes: the messages one after another, as fetchmail hands
    them to an MDA (LF line ends; ``set invisible`` keeps it from adding a
    Received: header). ``tls=None`` forbids STLS (``sslproto ''``),
    ``"stls"`` requires it, ``"implicit"`` is ``ssl``. TLS checks the
    certificate against ``cafile`` with common name "localhost". ``auth`` is
    fetchmail's auth keyword (default: fetchmail chooses).
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "fetchmail.out"
    out.write_bytes(b"")
    mda = f"/bin/sh -c 'cat >> {shlex.quote(str(out))}'"
    options = ["keep" if keep else "nokeep", "fetchall"]
    if tls is None:
        options.append("sslproto ''")
    else:
        if tls == "implicit":
            options.append("ssl")
        else:
            options.append("sslproto 'tls1.2+'")
        options.append("sslcertck")
        if cafile is not None:
            options.append(f'sslcertfile "{cafile}"')
        options.append("sslcommonname localhost")
    auth_opt = f" auth {auth}" if auth else ""
    rc = work / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        "set invisible\n"
        f'set idfile "{work / "fetchids"}"\n'
        f'set pidfile "{work / "fetchmail.pid"}"\n'
        f'poll "{host}" with proto POP3 port {port}{auth_opt} timeout {int(timeout)}\n'
        f'  user "{user}" there with password "{password}" is "root" here\n'
        f"  {' '.join(options)}\n"
        f'  mda "{mda}"\n'
    )
    os.chmod(rc, 0o600)
    env = dict(os.environ, FETCHMAILHOME=str(work), LC_ALL="C")
    _run(
        ["fetchmail", "--nodetach", "--verbose", "-f", str(rc)],
        timeout=timeout + 5,
        what="fetchmail",
        env=env,
    )
    return out.read_bytes()


def getmail_fetch(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    tls: Literal["implicit"] | None = None,
    cafile: str | None = None,
    workdir: str | os.PathLike[str],
    timeout: float = DEFAULT_TIMEOUT,
) -> list[bytes]:
    """getmail6 (read_all, no delete) delivering each message to its own file.

    Uses an ``MDA_external`` destination (``/bin/sh -c 'cat > N.eml'``, with
    ``allow_root_commands``) because getmail6 refuses to write a Maildir as
    root; ``received``/``delivered_to`` headers are off. Returns the delivered
    messages in order, as getmail hands them over (LF line ends).
    ``tls="implicit"`` uses SimplePOP3SSLRetriever with ``ca_certs = cafile``.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    outdir = work / "getmail.out"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir()
    retriever = "SimplePOP3SSLRetriever" if tls == "implicit" else "SimplePOP3Retriever"
    ssl_lines = ""
    if tls == "implicit" and cafile is not None:
        ssl_lines = f"ca_certs = {cafile}\n"
    script = f'cd {shlex.quote(str(outdir))} && n=$(ls | wc -l) && cat > "$(printf %04d.eml "$n")"'
    rc = work / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        f"type = {retriever}\n"
        f"server = {host}\n"
        f"port = {port}\n"
        f"username = {user}\n"
        f"password = {password}\n"
        f"timeout = {int(timeout)}\n"
        f"{ssl_lines}"
        "\n[destination]\n"
        "type = MDA_external\n"
        "path = /bin/sh\n"
        f"arguments = ('-c', {script!r})\n"
        "allow_root_commands = true\n"
        "\n[options]\n"
        "verbose = 0\n"
        "read_all = true\n"
        "delete = false\n"
        "received = false\n"
        "delivered_to = false\n"
        "message_log_syslog = false\n"
    )
    os.chmod(rc, 0o600)
    getmaildir = work / "getmail.state"
    if getmaildir.exists():
        shutil.rmtree(getmaildir)
    getmaildir.mkdir()
    _run(
        ["getmail", f"--getmaildir={getmaildir}", f"--rcfile={rc}"],
        timeout=timeout + 5,
        what="getmail",
    )
    return [p.read_bytes() for p in sorted(outdir.glob("*.eml"))]
