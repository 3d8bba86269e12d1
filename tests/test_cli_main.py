"""The entry point: lazy subcommand loading, summaries, usage errors in the right place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import popproxy
from popproxy.cli.main import COMMANDS, build_parser, main


def test_summaries_match_each_subcommand() -> None:
    full = build_parser(full=True)
    for name, summary in COMMANDS.items():
        assert name in full.commands
        listed = build_parser().format_help()
        assert summary in listed, name
    actions = [a for a in full._subparsers._group_actions]  # type: ignore[union-attr]
    helps = {c.dest: c.help for c in actions[0]._choices_actions}  # type: ignore[attr-defined]
    assert helps == COMMANDS


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_option_gets_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["show", "--bodys", "x.popcap"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: popproxy show")
    assert "unrecognized arguments: --bodys" in err


def test_only_the_chosen_subcommand_is_imported() -> None:
    code = (
        "import sys\n"
        "from popproxy.cli.main import main\n"
        "try:\n"
        "    main(['show', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('popproxy.cli.'))\n"
        "print(' '.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = done.stdout.split()[-2:]
    assert loaded == ["popproxy.cli.main", "popproxy.cli.show"]


def test_version_loads_no_subcommand() -> None:
    code = (
        "import sys\n"
        "from popproxy.cli.main import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('popproxy.cli.')))\n"
        "print('trio' in sys.modules, 'rich' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    lines = done.stdout.splitlines()
    assert lines[-2] == "['popproxy.cli.examples', 'popproxy.cli.main']"
    assert lines[-1] == "False False"


def test_show_loads_neither_trio_nor_tls_nor_the_filter_language() -> None:
    capture = Path(popproxy.__file__).parent / "data" / "demo.popcap"
    code = (
        "import sys\n"
        "from popproxy.cli.main import main\n"
        f"main(['show', {str(capture)!r}])\n"
        "loaded = ('trio', 'popproxy.tls', 'popproxy.inspect.filter', 'textual')\n"
        "print(*(m in sys.modules for m in loaded), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "RETR" in done.stdout
    assert done.stderr.splitlines()[-1] == "False False False False"


def test_every_subcommand_has_examples_and_documented_positionals() -> None:
    full = build_parser(full=True)
    for name in COMMANDS:
        text = full.commands[name].format_help()
        assert "examples:\n  # " in text, name
        for action in full.commands[name]._actions:
            if not action.option_strings:
                assert action.help, f"{name}: positional {action.dest} has no help"


def test_cli_reference_is_current() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_cli_docs.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
