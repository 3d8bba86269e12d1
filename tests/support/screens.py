"""What a Textual app shows, as plain text lines, from its SVG screenshot."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from rich.cells import cell_len

_SVG = "{http://www.w3.org/2000/svg}"
CHAR_WIDTH = 12.2  # Rich's SVG export: 0.61 of a 20px font per cell


def screen_lines(app: Any) -> list[str]:
    """The screen's rows of text, from ``App.export_screenshot()`` (one <text> per run)."""
    return screen_lines_from_svg(app.export_screenshot())


def screen_lines_from_svg(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    rows: dict[float, dict[int, str]] = {}
    for node in root.iter(f"{_SVG}text"):
        if node.get("textLength") is None:
            continue  # the window title
        y, x = float(node.get("y", "0")), float(node.get("x", "0"))
        row = rows.setdefault(y, {})
        column = round(x / CHAR_WIDTH)
        for ch in "".join(node.itertext()).replace("\xa0", " "):
            row[column] = ch
            column += cell_len(ch)
    lines = []
    for y in sorted(rows):
        row = rows[y]
        width = max(row) + 1 if row else 0
        lines.append(
            "".join(
                row.get(i, " " if i - 1 not in row or cell_len(row[i - 1]) < 2 else "")
                for i in range(width)
            ).rstrip()
        )
    return lines


def screen_text(app: Any) -> str:
    return "\n".join(screen_lines(app))
