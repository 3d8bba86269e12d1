"""Write the browser's screenshots in docs/images/ (SVG, and PNG when rsvg-convert exists).

They show the recorded Dovecot fixtures (tests/fixtures), so every run draws the same.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from tests.support.browse_shots import SHOTS, take
    from tests.support.fixture_captures import build_folder

    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "captures"
        build_folder(folder)
        for name in SHOTS:
            _app, svg = asyncio.run(take(folder, name))
            target = IMAGES / f"browse-{name}.svg"
            target.write_text(svg.replace(str(folder), "captures"), encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
            converter = shutil.which("rsvg-convert")
            if converter is not None:
                png = target.with_suffix(".png")
                subprocess.run([converter, "-o", str(png), str(target)], check=True)
                print(f"wrote {png.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
