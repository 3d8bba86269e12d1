"""Pure render functions: exchanges, anomalies and session lines as rich Text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from rich.text import Text

from popproxy.core.transcript import Exchange, SessionSummary
from popproxy.views import safe

_MASK_RE = re.compile(r"(#{3,})")


def _status_style(status: str | None) -> str:
    if status == "+OK":
        return "pop.ok"
    if status == "+":
        return "pop.cont"
    return "pop.err"


def fmt_octets(n: int) -> str:
    return f"{n:,} octets"


def fmt_size(n: int) -> str:
    """Octets in binary units: ``812 B``, ``6.3 KiB``, ``1.0 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_ms(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def prefix(t: float | None, tag: Text | None = None) -> Text:
    text = Text()
    if tag is not None:
        text.append_text(tag)
        text.append(" ")
    if t is not None:
        text.append(f"{t:9.3f}s ", style="pop.time")
    return text


def command_line(ex: Exchange, tag: Text | None = None) -> Text:
    """``C: VERB args`` (credential spans arrive masked from the observer)."""
    text = prefix(ex.t_sent, tag)
    if ex.command_by == "popproxy":  # three actors: popproxy's own command to the server
        text.append("popproxy → S: ", style="pop.warning")
    else:
        text.append("C: ", style="pop.client")
    safe.append(text, ex.command or "?", "pop.client")
    if ex.args is not None:
        text.append(" ")
        _append_masked(text, ex.args)
    return text


def masked_parts(value: str) -> Iterator[tuple[str, bool]]:
    """Split text into (piece, is_secret): runs of ``#`` filler are masked credentials."""
    for i, part in enumerate(_MASK_RE.split(value)):
        if part:
            yield part, bool(i % 2)


def _append_masked(text: Text, value: str) -> None:
    """Show masked credentials as dots in the secret style."""
    for part, secret in masked_parts(value):
        if secret:
            safe.append(text, "•" * len(part), "pop.secret")
        else:
            safe.append(text, part, "pop.args")


def reply_line(ex: Exchange, tag: Text | None = None, *, folded: bool = True) -> Text:
    """``S: +OK text [code]  (latency)`` plus a one-line body summary when folded."""
    t = ex.t_reply if ex.t_reply is not None else ex.t_end
    text = prefix(t, tag)
    if ex.reply_by == "popproxy":  # three actors: popproxy's own line, not the server's
        text.append("popproxy: ", style="pop.warning")
    else:
        text.append("S: ", style="pop.server")
    if ex.status is None:
        if ex.withheld is not None:
            text.append("(no reply)", style="pop.err")
            _append_withheld(text, ex.withheld)
        elif ex.kind == "unsolicited":  # a line that is not a status line at all
            _append_masked(text, ex.text or "")
            text.append("  (not a status line)", style="pop.warning")
        else:
            text.append("(no reply)", style="pop.err")
        return text
    safe.append(text, ex.status, _status_style(ex.status))
    if ex.code:
        safe.append(text, f" [{ex.code}]", "pop.code")
    if ex.text:
        text.append(" ")
        _append_masked(text, ex.text)
    if ex.kind == "greeting":
        text.append("  greeting", style="pop.muted")
    elif ex.kind == "unsolicited":
        text.append("  unsolicited", style="pop.warning")
    elif ex.t_sent is not None and ex.t_reply is not None:
        safe.append(text, f"  ({fmt_ms(ex.t_reply - ex.t_sent)})", "pop.latency")
    if ex.withheld is not None:
        _append_withheld(text, ex.withheld)
    elif folded and ex.multiline:
        text.append("  ")
        text.append_text(body_summary(ex))
    return text


def _append_withheld(text: Text, withheld: dict[str, Any]) -> None:
    """``✂ withheld: the server's +OK go ahead (why)``: a reply the client never got."""
    text.append("  ✂ withheld from the client: the server's ", style="pop.warning")
    safe.append(text, str(withheld.get("status") or "line"), _status_style(withheld.get("status")))
    if withheld.get("code"):
        safe.append(text, f" [{withheld['code']}]", "pop.code")
    if withheld.get("text"):
        text.append(" ")
        _append_masked(text, str(withheld["text"]))
    if withheld.get("why"):
        safe.append(text, f" ({withheld['why']})", "pop.warning")


def body_summary(ex: Exchange) -> Text:
    """A folded body: lines, octets, and for messages From/Subject/attachments."""
    text = Text("⤷ ", style="pop.body")
    if ex.body_lines is None:
        text.append("body…", style="pop.body")
        return text
    safe.append(text, f"{ex.body_lines:,} lines, {fmt_octets(ex.body_octets or 0)}", "pop.body")
    if ex.truncated:
        text.append(" TRUNCATED", style="pop.err")
    if ex.message is not None:
        m = ex.message
        if m.sender:
            safe.append(text, f" · From: {m.sender}", "pop.body")
        if m.subject:
            safe.append(text, f" · Subject: {m.subject}", "pop.body")
        if m.attachments:
            safe.append(text, f" · 📎 {', '.join(m.attachments[:5])}", "pop.body")
    elif ex.listing is not None and ex.command in ("CAPA", "AUTH"):
        words = " ".join(" ".join(x) for x in ex.listing[:12])
        safe.append(text, f" · {words}", "pop.body")
    return text


def body_text(data: bytes) -> Text:
    """Body bytes as shown with ``--bodies`` or ``--verbose``: lines kept, controls escaped."""
    value = data.decode("utf-8", "backslashreplace").replace("\r\n", "\n").rstrip("\n")
    return safe.text(value, "pop.body", keep=safe.MULTI_LINE)


def sasl_line(entry: dict[str, Any], t: float, tag: Text | None = None) -> Text:
    """One line of a SASL exchange: a server challenge, or a (masked) client response."""
    text = prefix(t, tag)
    if entry.get("from") == "server":
        text.append("S: ", style="pop.server")
        safe.append(text, entry["line"], "pop.cont")
        if entry.get("decoded"):
            safe.append(text, f"  ({entry['decoded']})", "pop.muted")
    else:
        text.append("C: ", style="pop.client")
        if entry.get("cancel"):
            text.append("* (cancel)", style="pop.client")
        elif entry.get("secret", True) and entry["line"]:
            safe.append(text, f"[SASL response, {len(entry['line'])} octets]", "pop.secret")
        else:
            safe.append(text, entry["line"], "pop.client")
        if entry.get("decoded"):
            safe.append(text, f"  ({entry['decoded']})", "pop.muted")
    return text


def identity_line(detail: dict[str, Any], t: float | None, tag: Text | None = None) -> Text:
    """Who logged in, as the SASL client data named it (never the credential)."""
    text = prefix(t, tag)
    text.append("👤 identity ", style="pop.muted")
    safe.append(text, str(detail.get("identity", "")), "pop.client")
    extra = [str(detail.get("mechanism", ""))]
    extra += [f"{k}={v}" for k, v in (detail.get("details") or {}).items()]
    safe.append(text, f" ({', '.join(x for x in extra if x)})", "pop.muted")
    return text


def anomaly_line(record: dict[str, Any], t: float | None, tag: Text | None = None) -> Text:
    text = prefix(t, tag)
    who = "client" if record.get("dir") == "c" else "server"
    if record.get("by") == "popproxy":  # three actors: popproxy's own bytes caused it
        who = "popproxy"
    safe.append(text, f"⚠ {record['kind']}", "pop.anomaly")
    safe.append(text, f" ({who}", "pop.warning")
    if record.get("seq") is not None:
        safe.append(text, f", command #{record['seq']}", "pop.warning")
    text.append(")", style="pop.warning")
    if record.get("detail"):
        safe.append(text, f" {record['detail']}", "pop.warning")
    return text


def state_line(state: str, t: float | None, tag: Text | None = None) -> Text:
    text = prefix(t, tag)
    safe.append(text, f"── {state} ──", "pop.state")
    return text


def tls_line(detail: dict[str, Any], t: float | None, tag: Text | None = None) -> Text:
    text = prefix(t, tag)
    leg = detail.get("leg", "?")
    side = {"client": "client ⇄ popproxy", "upstream": "popproxy ⇄ server"}.get(str(leg), leg)
    safe.append(text, f"🔒 TLS {side}", "pop.tls")
    for key, label in TLS_FIELDS:
        if detail.get(key):
            safe.append(text, f" {label}={detail[key]}", "pop.muted")
    if detail.get("verified") is True:
        text.append(" verified", style="pop.ok")
    elif detail.get("verified") is False:
        text.append(" NOT verified (--insecure)", style="pop.error")
    if detail.get("decrypted") is False:
        text.append(" (passthrough: not decrypted, the rest is opaque)", style="pop.warning")
    return text


TLS_FIELDS = (
    ("mode", "mode"),
    ("version", "version"),
    ("cipher", "cipher"),
    ("sni", "sni"),
    ("peer_subject", "peer"),
    ("peer_issuer", "issuer"),
)


def note_line(message: str, t: float | None, style: str, tag: Text | None = None) -> Text:
    text = prefix(t, tag)
    safe.append(text, message, style)
    return text


def session_end_line(
    how: str, error: str | None, duration: float, session: SessionSummary, tag: Text | None = None
) -> Text:
    text = prefix(None, tag)
    style = "pop.ok" if how in ("quit", "closed", "client-closed", "server-closed") else "pop.err"
    safe.append(text, f"session ended: {how}", style)
    safe.append(text, f" after {fmt_ms(duration)}, {session.commands} commands", "pop.muted")
    if session.user:
        safe.append(text, f", user {session.user}", "pop.muted")
    if session.anomalies:
        safe.append(text, f", {len(session.anomalies)} anomalies", "pop.warning")
    if error:
        safe.append(text, f" — {error}", "pop.error")
    return text
