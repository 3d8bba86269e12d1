"""Statistics, machine facts and rendering of benchmark tables (rich and markdown)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table as RichTable


@dataclass
class Table:
    """One benchmark's results: a title, columns, rows of text and notes."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def ratio(value: float, base: float | None) -> str:
    if base is None or base != base or base == 0 or value != value:
        return "—"
    return f"{value / base:.2f}×"


def fmt(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    return (
        f"nproc {cpus}, {cpu_model()}, Python {platform.python_version()}, "
        f"Linux {platform.release()}"
    )


def filesystem(path: Path) -> str:
    """The file-system type holding ``path`` (longest /proc/mounts prefix), tmpfs or disk."""
    target = str(path.resolve())
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    memory = kind in {"tmpfs", "ramfs"}
    return f"{kind} ({'memory' if memory else 'disk'}, mounted on {best or '?'})"


def show(console: Console, table: Table) -> None:
    rich_table = RichTable(title=table.title, title_justify="left")
    for i, column in enumerate(table.columns):
        rich_table.add_column(column, justify="left" if i == 0 else "right")
    for row in table.rows:
        rich_table.add_row(*row)
    console.print(rich_table)
    for note in table.notes:
        console.print(f"  [dim]note:[/dim] {note}", highlight=False, soft_wrap=True)


def markdown(table: Table) -> str:
    lines = [f"### {table.title}", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    lines += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows
    ]
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def append_markdown(path: Path, header: list[str], tables: list[Table]) -> None:
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"## popproxy bench, {stamp}", ""] + [f"- {line}" for line in header] + [""]
    parts += [markdown(table) for table in tables]
    with path.open("a", encoding="utf-8") as stream:
        stream.write("\n".join(parts) + "\n")
