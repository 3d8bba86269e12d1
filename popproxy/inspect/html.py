"""``export --html``: one self-contained HTML page of a transcript, written in batches."""

from __future__ import annotations

import io
from html import escape
from pathlib import Path
from typing import IO, Any

from popproxy import fsutil
from popproxy.capture.reader import CaptureReader
from popproxy.core.transcript import Exchange
from popproxy.core.values import decode_text
from popproxy.inspect import Progress
from popproxy.inspect.text import Note, walk
from popproxy.views import render
from popproxy.views.render import masked_parts

PREVIEW_LIMIT = 64 * 1024  # octets of each body shown in the page
BATCH = 256 * 1024  # characters of HTML gathered before a write

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.3em}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.15em 1em}
dl.facts dt{font-weight:bold;color:#555}dl.facts dd{margin:0;font-family:monospace}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.t,td.seq,td.lat{font-family:monospace;white-space:nowrap;color:#777}
td.cmd,td.rep{font-family:monospace;word-break:break-all}
.c{color:#06c}.ok{color:#080;font-weight:bold}.err{color:#c00;font-weight:bold}
.cont{color:#a60}.code{background:#fe6;color:#530;border-radius:3px;padding:0 .3em}
.secret{background:#c00;color:#fff;border-radius:2px}
tr.err-row{background:#fff3f3}tr.anomaly{background:#fdd;color:#800;font-weight:bold}
tr.tls{background:#eefbea;color:#060}tr.state{color:#339;font-weight:bold}
tr.alert{background:#fff6dd;color:#840}tr.muted{color:#888}
details pre{background:#f7f7f7;padding:.5em;max-height:30em;overflow:auto;white-space:pre-wrap}
summary{cursor:pointer;color:#238}.sasl{color:#a60;margin:0;padding-left:1em}
.warn{color:#c00}
"""


def _masked(value: str) -> str:
    """HTML of a string whose ``#`` runs are masked credentials."""
    return "".join(
        f'<span class="secret" title="masked">{"•" * len(part)}</span>' if secret else escape(part)
        for part, secret in masked_parts(value)
    )


def _time(t: object) -> str:
    return f"{t:.3f}s" if isinstance(t, int | float) and not isinstance(t, bool) else ""


class _Page:
    """Buffers HTML and writes it in batches, so memory stays bounded."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.parts: list[str] = []
        self.size = 0

    def add(self, html: str) -> None:
        self.parts.append(html)
        self.size += len(html)
        if self.size >= BATCH:
            self.flush()

    def flush(self) -> None:
        self.out.write("".join(self.parts))
        self.parts, self.size = [], 0


def _facts(reader: CaptureReader) -> list[tuple[str, Any]]:
    h = reader.header
    facts: list[tuple[str, Any]] = [
        ("capture", reader.path.name),
        ("session", h.get("session")),
        ("started", h.get("start")),
        ("client", h.get("client")),
        ("upstream", h.get("upstream")),
        ("listen", h.get("listen")),
        ("STLS mode", h.get("stls")),
        ("popproxy", h.get("popproxy")),
    ]
    if h.get("insecure"):
        facts.append(("upstream TLS", "INSECURE (certificate not verified)"))
    end = reader.end()
    if end is not None:
        octets = end.get("octets") or {}
        facts += [
            ("ended", end.get("how")),
            ("duration", _time(end.get("t"))),
            ("commands", end.get("commands")),
            ("user", end.get("user")),
            ("mechanism", end.get("mechanism")),
            ("anomalies", end.get("anomalies")),
            ("octets client → server", octets.get("c")),
            ("octets server → client", octets.get("s")),
        ]
        if end.get("error"):
            facts.append(("error", end.get("error")))
    return [(k, v) for k, v in facts if v not in (None, "")]


def _exchange_row(ex: Exchange, preview: bytearray | None) -> str:
    status_class = {"+OK": "ok", "+": "cont"}.get(ex.status or "", "err")
    row_class = "ex" if ex.status in ("+OK", "+") else "ex err-row"
    when = ex.t_sent if ex.t_sent is not None else ex.t_reply
    cells = [
        f'<td class="t">{_time(when)}</td>',
        f'<td class="seq">{"" if ex.seq is None else ex.seq}</td>',
    ]
    if ex.kind == "command":
        cmd = f'<span class="c">C: {escape(ex.command or "?")}</span>'
        if ex.args is not None:
            cmd += " " + _masked(ex.args)
        for entry in ex.sasl:
            cmd += f'<div class="sasl">{escape(_sasl_text(entry))}</div>'
    else:
        cmd = f'<span class="c">({escape(ex.kind)})</span>'
    cells.append(f'<td class="cmd">{cmd}</td>')
    if ex.status is None:
        rep = '<span class="err">(no reply)</span>'
        row_class = "ex err-row"
    else:
        rep = f'S: <span class="{status_class}">{escape(ex.status)}</span>'
        if ex.code:
            rep += f' <span class="code">[{escape(ex.code)}]</span>'
        if ex.text:
            rep += " " + _masked(ex.text)
    if ex.multiline and ex.body_lines is not None:
        rep += _details(ex, preview)
    cells.append(f'<td class="rep">{rep}</td>')
    latency = ""
    if ex.kind == "command" and ex.t_sent is not None and ex.t_reply is not None:
        latency = render.fmt_ms(ex.t_reply - ex.t_sent)
    cells.append(f'<td class="lat">{latency}</td>')
    return f'<tr class="{row_class}">{"".join(cells)}</tr>\n'


def _sasl_text(entry: dict[str, Any]) -> str:
    """A SASL line as the text view shows it: client responses only by their size."""
    if entry.get("from") == "server":
        decoded = f"  ({entry['decoded']})" if entry.get("decoded") else ""
        return f"S: {entry.get('line', '')}{decoded}"
    if entry.get("cancel"):
        return "C: * (cancel)"
    decoded = f"  ({entry['decoded']})" if entry.get("decoded") else ""
    if entry.get("secret", True) and entry.get("line"):
        return f"C: [SASL response, {len(entry.get('line', ''))} octets]{decoded}"
    return f"C: {entry.get('line', '')}{decoded}"


def _details(ex: Exchange, preview: bytearray | None) -> str:
    summary = render.body_summary(ex).plain.removeprefix("⤷ ")
    warn = ' <span class="err">TRUNCATED</span>' if ex.truncated else ""
    body = escape(decode_text(bytes(preview or b"")))
    more = ""
    if (ex.body_octets or 0) > len(preview or b""):
        more = (
            f'<div class="warn">… first {len(preview or b""):,} of '
            f"{ex.body_octets or 0:,} octets shown</div>"
        )
    return (
        f"<details><summary>{escape(summary.replace(' TRUNCATED', ''))}{warn}</summary>"
        f"<pre>{body}</pre>{more}</details>"
    )


def _note_row(t: float | None, text: str, css: str) -> str:
    return (
        f'<tr class="{css}"><td class="t">{_time(t)}</td><td></td>'
        f'<td colspan="3">{escape(text)}</td></tr>\n'
    )


def export_html(
    reader: CaptureReader,
    path: Path,
    *,
    replace: bool = False,
    progress: Progress | None = None,
) -> int:
    """Write the page to ``path``; return the number of exchanges in it."""
    exchanges = 0
    previews: dict[int, bytearray] = {}
    with (
        fsutil.output_file(path, replace=replace) as raw,
        io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as out,
    ):
        page = _Page(out)
        title = escape(f"popproxy: {reader.path.name}")
        page.add(
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title><style>{CSS}</style></head><body>\n"
            f'<h1>{title}</h1>\n<dl class="facts">\n'
        )
        for key, value in _facts(reader):
            page.add(f"<dt>{escape(key)}</dt><dd>{escape(str(value))}</dd>\n")
        page.add(
            "</dl>\n<table><thead><tr><th>time</th><th>#</th><th>command</th>"
            "<th>reply</th><th>latency</th></tr></thead><tbody>\n"
        )
        for item in walk(reader, progress):
            ex = item.exchange
            if item.what == "body" and ex is not None and ex.seq is not None:
                seen = previews.setdefault(ex.seq, bytearray())
                if len(seen) < PREVIEW_LIMIT:
                    seen += item.detail[: PREVIEW_LIMIT - len(seen)]
            elif item.what in ("done", "unfinished") and ex is not None:
                preview = previews.pop(ex.seq, None) if ex.seq is not None else None
                page.add(_exchange_row(ex, preview))
                exchanges += 1
            elif item.what == "anomaly":
                page.add(_note_row(item.t, render.anomaly_line(item.detail, None).plain, "anomaly"))
            elif item.what == "state":
                page.add(_note_row(item.t, f"── {item.detail} ──", "state"))
            elif item.what == "closed":
                page.add(_note_row(item.t, f"{item.detail} closed the connection", "muted"))
            elif item.what == "note":
                note: Note = item.detail
                css = (
                    "tls"
                    if note.kind == "tls" and not note.alert
                    else ("alert" if note.alert else "muted")
                )
                page.add(_note_row(item.t, note.text, css))
        page.add("</tbody></table>\n")
        for warning in reader.warnings:
            page.add(f'<p class="warn">{escape(warning)}</p>\n')
        page.add("</body></html>\n")
        page.flush()
    return exchanges
