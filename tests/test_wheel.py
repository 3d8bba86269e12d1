"""popproxy installed from its wheel, away from the source tree: --help points at docs it has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, unpacked into a folder of its own."""
    work = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-300:]}")
    (wheel,) = work.glob("popproxy-*.whl")
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True,
        timeout=300,
    )
    return target


def _run(target: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(target), NO_COLOR="1")
    done = subprocess.run(
        [sys.executable, "-m", "popproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=target.parent,  # not the source tree
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_wheel_is_the_copy_that_runs(installed: Path) -> None:
    path = _run(installed, "docs", "--path", "replay").strip()
    assert path.startswith(str(installed)), path
    assert Path(path).read_text().startswith("# ")


def test_every_document_help_names_is_installed(installed: Path) -> None:
    from popproxy.cli.main import COMMANDS

    names = set(_run(installed, "docs").split()[::1])
    texts = [_run(installed, "--help")] + [_run(installed, name, "--help") for name in COMMANDS]
    cited = {m for text in texts for m in re.findall(r"popproxy docs ([\w.-]+)", text)}
    assert cited, "the help texts cite documents"
    for name in cited:
        assert name in names, name
        assert _run(installed, "docs", name).strip()
    for text in texts:
        assert not re.search(r"\bdocs/[\w.-]+", text), "help must not cite source-tree paths"
