"""Layout snapshots of popproxy browse: the screen's text compared with tests/snapshots/.

Set POPPROXY_UPDATE_SNAPSHOTS=1 to rewrite them after a deliberate change (and rerun
scripts/make_screenshots.py for the images in docs/).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.support.browse_shots import SHOTS, take
from tests.support.fixture_captures import build_folder

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fixtures")
    build_folder(path)
    return path


@pytest.mark.parametrize("name", sorted(SHOTS))
def test_layout_matches_snapshot(name: str, folder: Path) -> None:
    app, svg = asyncio.run(take(folder, name))
    assert svg.startswith("<svg")
    lines = [line.replace(str(folder), "FOLDER") for line in app.snapshot_lines]  # type: ignore[attr-defined]
    golden = SNAPSHOTS / f"browse-{name}.txt"
    if os.environ.get("POPPROXY_UPDATE_SNAPSHOTS"):
        golden.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = golden.read_text(encoding="utf-8").splitlines()
    assert lines == expected, f"layout changed: compare with {golden}"
