"""``popproxy export``: write what a capture holds in other forms (streams, .eml, text, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from popproxy import fsutil
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.errors import report
from popproxy.inspect import Progress
from popproxy.inspect.eml import export_eml
from popproxy.inspect.html import export_html
from popproxy.inspect.pcap import export_pcap
from popproxy.inspect.streams import export_streams
from popproxy.inspect.text import export_text
from popproxy.proxy.config import UsageError
from popproxy.views.progress import ScanProgress

EXPORTS = ("streams", "eml", "text", "html", "pcap")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="export a capture (raw streams, messages, text, ...)",
        description="Export what a capture holds. Flags may be combined.",
    )
    p.add_argument("capture", metavar="CAPTURE", help="the capture to export")
    p.add_argument(
        "--streams",
        metavar="DIR",
        help="write DIR/client.bin and DIR/server.bin: the bytes each side sent",
    )
    p.add_argument(
        "--eml",
        metavar="DIR",
        help="write every message retrieved with RETR to DIR as an .eml file, "
        "named by its UIDL unique-id when the session listed it",
    )
    p.add_argument(
        "--include-top",
        action="store_true",
        help="with --eml: also write TOP results (names end in -top)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        help="write a plain-text transcript (C:/S: lines, credentials masked)",
    )
    p.add_argument(
        "--html", metavar="FILE", help="write a self-contained HTML page of the transcript"
    )
    p.add_argument(
        "--pcap",
        metavar="FILE",
        help="write the client leg as a pcap file (IPv4/TCP, server port 110) for Wireshark/tshark",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace files that already exist (by default an existing name is an error "
        "and nothing is overwritten)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    wanted = [name for name in EXPORTS if getattr(args, name, None)]
    if not wanted:
        raise UsageError(
            "say what to export: --streams DIR, --eml DIR, --text FILE, --html FILE or --pcap FILE"
        )
    if args.include_top and not args.eml:
        raise UsageError("--include-top goes with --eml DIR")
    with CaptureReader(args.capture) as reader:
        for name in wanted:
            target = Path(getattr(args, name))
            try:
                with ScanProgress(f"export --{name}", [reader.path]) as bar:
                    progress = bar.capture(reader.path, reader.size)
                    notes = _export(reader, name, target, args, progress)
            except fsutil.Exists as exc:
                raise CaptureError(
                    f"--{name}: {exc.filename} exists; nothing was overwritten "
                    "(--force replaces existing files)"
                ) from None
            except OSError as exc:
                raise CaptureError(f"--{name} {target}: {exc.strerror or exc}") from None
            for note in notes:  # after the progress bar is gone
                report("export", note, level="")
        for warning in dict.fromkeys(reader.warnings):
            report("export", f"{warning}", level="warning")
    return 0


def _export(
    reader: CaptureReader,
    name: str,
    target: Path,
    args: argparse.Namespace,
    progress: Progress | None,
) -> list[str]:
    """Run one exporter; return the notes to show about what it wrote."""
    replace = bool(args.force)
    if name == "streams":
        streams = export_streams(reader, target, replace=replace, progress=progress)
        if streams.redacted:
            return [
                f"warning: {streams.redacted} credential span(s) are redacted with '#' filler "
                "(recorded without --keep-secrets)"
            ]
    elif name == "eml":
        result = export_eml(
            reader, target, include_top=args.include_top, replace=replace, progress=progress
        )
        return [f"warning: {w}" for w in result.warnings] + [
            f"{len(result.written)} message(s) written to {target}"
        ]
    elif name == "text":
        export_text(reader, target, replace=replace, progress=progress)
    elif name == "html":
        export_html(reader, target, replace=replace, progress=progress)
    elif name == "pcap":
        pcap = export_pcap(reader, target, replace=replace, progress=progress)
        return [
            f"{pcap.packets} packets on {pcap.connections} connection(s) written to {target}",
            *(f"  {line}" for line in pcap.endpoints),
        ]
    return []
