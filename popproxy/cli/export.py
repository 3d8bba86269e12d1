"""``popproxy export``: write what a capture holds in other forms (streams, .eml, text, ...)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.proxy.config import UsageError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="export a capture (raw streams, messages, text, ...)",
                       description="Export what a capture holds. Flags may be combined.")
    p.add_argument("capture", metavar="CAPTURE")
    p.add_argument("--streams", metavar="DIR",
                   help="write DIR/client.bin and DIR/server.bin: the bytes each side sent")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    wanted = [name for name in ("streams",) if getattr(args, name, None)]
    if not wanted:
        raise UsageError("say what to export, e.g. --streams DIR")
    with CaptureReader(args.capture) as reader:
        if args.streams:
            export_streams(reader, Path(args.streams))
        for warning in reader.warnings:
            print(f"popproxy export: warning: {warning}", file=sys.stderr)
    return 0


def export_streams(reader: CaptureReader, out: Path) -> tuple[int, int]:
    """The bytes each side sent, as recorded: popproxy's own bytes are left out."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = {d: open(out / name, "wb")  # noqa: SIM115 - closed below
                 for d, name in (("c", "client.bin"), ("s", "server.bin"))}
    except OSError as exc:
        raise CaptureError(f"cannot write to {out}: {exc.strerror or exc}") from None
    sizes = {"c": 0, "s": 0}
    redacted = 0
    try:
        for record in reader.records():
            if record.kind == fmt.DATA and record.data is not None and not record.fields.get("p"):
                d = record.fields.get("d", "s")
                files[d].write(record.data)
                sizes[d] += len(record.data)
            elif record.kind == fmt.REDACT and record.fields.get("masked", True):
                redacted += 1
    finally:
        for f in files.values():
            f.close()
    if redacted:
        print(f"popproxy export: warning: {redacted} credential span(s) are redacted with "
              f"'#' filler (recorded without --keep-secrets)", file=sys.stderr)
    return sizes["c"], sizes["s"]
