"""Write docs/cli.md from the parser itself, so the reference cannot drift from --help."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps help at $COLUMNS; fixed so the file is the same everywhere


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    sys.path.insert(0, str(ROOT))  # this checkout's popproxy, whatever the venv points at
    from popproxy.cli.main import COMMANDS, build_parser

    parser = build_parser(full=True)
    parts = [
        "# Command-line reference",
        "",
        "Generated from the parser by `python scripts/make_cli_docs.py`; "
        "`tests/test_cli_main.py` fails when it is out of date.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name in COMMANDS:
        parts += ["", f"## popproxy {name}", "", "```text"]
        parts += [parser.commands[name].format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python scripts/make_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
