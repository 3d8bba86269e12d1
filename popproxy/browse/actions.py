"""The browser's exports, by the target's suffix, through the exporters in inspect/."""

from __future__ import annotations

from pathlib import Path

from popproxy.capture.reader import CaptureReader
from popproxy.inspect.html import export_html
from popproxy.inspect.pcap import export_pcap
from popproxy.inspect.text import export_text

SUFFIXES = {".txt": "text", ".text": "text", ".html": "HTML", ".htm": "HTML", ".pcap": "pcap"}


def export_session(capture: Path, target: Path) -> str:
    """Export ``capture`` to ``target`` (never over an existing file); a note saying what."""
    kind = SUFFIXES.get(target.suffix.lower())
    if kind is None:
        raise ValueError(f"{target}: name it .txt, .html or .pcap to choose the format")
    with CaptureReader(capture) as reader:
        if kind == "text":
            lines = export_text(reader, target)
            return f"wrote {target} ({lines} lines)"
        if kind == "HTML":
            exchanges = export_html(reader, target)
            return f"wrote {target} ({exchanges} exchanges)"
        result = export_pcap(reader, target)
        return f"wrote {target} ({result.packets} packets)"
