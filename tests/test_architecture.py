"""The layering of docs/architecture.md holds: no module imports from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "popproxy"
# docs/architecture.md, "Where things live": a room may import rooms of its layer or below.
LAYERS = {
    "core": 1,
    "capture": 2,
    "tls": 2,
    "views": 2,
    "faults": 3,
    "inspect": 3,
    "proxy": 4,
    "replay": 4,
    "browse": 5,
    "cli": 5,
}
SHARED = {"errors", "escapes", "hints", "fsutil", "netutil"}  # layer 0: below everything


def _layer(parts: list[str]) -> int:
    if parts[0] in SHARED:
        return 0
    if parts[0] in LAYERS:
        return LAYERS[parts[0]]
    return 99  # popproxy/__init__.py, __main__.py: the top


def _imports(path: Path) -> list[list[str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [n.split(".")[1:] for n in names if n.startswith("popproxy.")]
    return [parts for parts in found if parts]


def test_no_module_imports_from_a_layer_above() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        own = _layer(parts)
        for target in _imports(path):
            if _layer(target) > own:
                upward.append(f"{'/'.join(parts)} imports popproxy.{'.'.join(target)}")
    assert upward == []


def test_every_room_is_in_the_table() -> None:
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms <= set(LAYERS), rooms - set(LAYERS)
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= SHARED, modules - SHARED


def test_every_anomaly_kind_is_documented_and_emitted() -> None:
    from popproxy.core.events import AnomalyKind

    doc = (PACKAGE.parent / "docs" / "observer.md").read_text(encoding="utf-8")
    source = "\n".join(p.read_text(encoding="utf-8") for p in (PACKAGE / "core").glob("*.py"))
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    for kind in AnomalyKind:
        assert any(f"`{kind.value}`" in row.split(" | ")[0] for row in rows), kind
        assert f"AnomalyKind.{kind.name}" in source, f"{kind} is never emitted"


def test_the_relay_controller_imports_no_io_library() -> None:
    """docs/controller.md: sans-IO, so its decisions can be tested byte by byte."""
    import subprocess
    import sys

    code = (
        "import sys, popproxy.proxy.controller\n"
        "print(sorted(m for m in ('trio', 'socket', 'ssl', 'selectors', 'asyncio', 'io_uring')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]"
