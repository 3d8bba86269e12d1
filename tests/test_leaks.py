"""No output shows a credential: every mechanism, through every command that reads a capture."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

from popproxy.capture import format as fmt
from popproxy.cli.main import main
from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.script import load_session
from popproxy.views.theme import THEME
from tests.support.leaks import (
    LOGINS,
    PASSWORD,
    SCRAM_PROOF,
    SCRAM_SIGNATURE,
    TOKEN,
    Login,
    apop_digest,
    assert_no_leak,
    cram_digest,
    find_leaks,
    session_steps,
)
from tests.test_credentials import run_tap

SECRETS = [PASSWORD, TOKEN, apop_digest(), cram_digest(), SCRAM_PROOF, SCRAM_SIGNATURE]
WRONG = b"Wr0ng-but-still-secret"


def write_capture(path: Path, steps: list[tuple[str, bytes]], **kw: Any) -> Path:
    capture, _ = run_tap(steps, **kw)
    end = fmt.encode_meta({"r": fmt.END, "t": 0.5, "how": "quit", "error": None})
    path.write_bytes(capture.replace(b'"start"', b'"client":"127.0.0.1:1","start"', 1) + end)
    return path


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("captures")
    for login in LOGINS:
        write_capture(folder / f"{login.name}.popcap", session_steps(login))
        write_capture(
            folder / f"{login.name}-lost-sync.popcap",
            session_steps(login, pipelined=10),
            max_pending=4,
        )
    return folder


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    main(argv)
    got = capsys.readouterr()
    return got.out + got.err


def test_captures_hold_the_exchanges(captures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The check below can fail: the outputs do show the users and the echo lines."""
    out = run(["show", str(captures)], capsys)
    assert "alice" in out and "rejected" in out and "XOAUTH2" in out


def test_inspect_commands_never_show_a_secret(
    captures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs: dict[str, bytes | str] = {}
    for path in sorted(captures.glob("*.popcap")):
        outputs[f"file {path.name}"] = path.read_bytes()
    for argv in (
        ["show"],
        ["show", "--raw"],
        ["show", "--json"],
        ["show", "--bodies"],
        ["show", "--errors"],
        ["list"],
        ["list", "--json"],
        ["stats"],
        ["stats", "--json"],
        ["lint"],
        ["lint", "--json"],
    ):
        outputs[" ".join(argv)] = run([*argv, str(captures)], capsys)
    for login in LOGINS:
        plain, lost = captures / f"{login.name}.popcap", captures / f"{login.name}-lost-sync.popcap"
        outputs[f"diff {login.name}"] = run(["diff", str(plain), str(lost)], capsys)
        outputs[f"diff --json {login.name}"] = run(
            ["diff", "--json", str(plain), str(lost)], capsys
        )
        for path in (plain, lost):
            out = tmp_path / path.stem
            outputs[f"export {path.name}"] = run(
                [
                    "export",
                    str(path),
                    "--streams",
                    str(out / "streams"),
                    "--eml",
                    str(out / "eml"),
                    "--text",
                    str(out / "t.txt"),
                    "--html",
                    str(out / "t.html"),
                    "--pcap",
                    str(out / "t.pcap"),
                ],
                capsys,
            )
            for written in sorted(out.rglob("*")):
                if written.is_file():
                    outputs[f"export {path.name}: {written.name}"] = written.read_bytes()
    assert len(outputs) > 100
    assert_no_leak(outputs, SECRETS)


def _replay_argv(path: Path, port: int) -> list[str]:
    return ["replay", str(path), "--server", f"127.0.0.1:{port}", "--timeout", "5"]


@pytest.mark.parametrize("login", LOGINS, ids=lambda x: x.name)
async def test_serve_and_replay_never_show_a_secret(
    login: Login, captures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serve the capture (the log, near misses, the wrong-password line) and replay it
    against that server, once with the right password and once with a wrong one."""
    path = captures / f"{login.name}.popcap"
    log = io.StringIO()
    console = Console(file=log, theme=THEME, force_terminal=True, width=200)
    config = ServeConfig(
        [load_session(path)], listen=("127.0.0.1", 0), password=PASSWORD.decode(), repeat=True
    )
    server = FakeServer(config, console.print)
    outputs: dict[str, bytes | str] = {}
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            await serve_replay(config, None, announce=False, server=server, task_status=task_status)

        port = (await nursery.start(serve))[0][1]
        for name, password in (("right", PASSWORD), ("wrong", WRONG)):
            os.environ["POPPROXY_PASSWORD"] = password.decode()
            try:
                capsys.readouterr()
                await trio.to_thread.run_sync(main, _replay_argv(path, port))
                got = capsys.readouterr()
                outputs[f"replay ({name} password)"] = got.out + got.err
            finally:
                del os.environ["POPPROXY_PASSWORD"]
        # A client that sends its credential line again: a near miss in the log.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.receive_some(4096)
        for _, line in [s for s in login.steps if s[0] == "c"][:2]:
            await stream.send_all(line)
            with trio.move_on_after(2):
                await stream.receive_some(4096)
        await stream.send_all(next(line for d, line in login.steps if d == "c"))
        with trio.move_on_after(2):
            await stream.receive_some(4096)
        await stream.aclose()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    outputs["serve log"] = log.getvalue()
    outputs["near misses"] = "\n".join(m.describe() for m in server.report.near_misses)
    assert "#1" in log.getvalue()
    if os.environ.get("LEAKS_DEBUG"):
        print(outputs)
    assert_no_leak(outputs, [*SECRETS, WRONG])


def test_leak_check_sees_an_unmasked_capture(tmp_path: Path) -> None:
    """A capture written with --keep-secrets does hold the password: the helper finds it."""
    steps = session_steps(LOGINS[0])
    capture, _ = run_tap(steps)
    assert not find_leaks({"c": capture}, [PASSWORD])
    assert find_leaks({"raw": b"".join(data for _, data in steps)}, [PASSWORD])


@pytest.mark.parametrize(
    "password", ["x9!", " leading space", "a much longer password than before"]
)
async def test_replay_compares_pass_by_structure(
    password: str, captures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PASS is the same command whatever the live password's length or leading spaces."""
    path = captures / "pass-sp.popcap"
    config = ServeConfig([load_session(path)], listen=("127.0.0.1", 0))  # accepts any password
    server = FakeServer(config)
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            await serve_replay(config, None, announce=False, server=server, task_status=task_status)

        port = (await nursery.start(serve))[0][1]
        os.environ["POPPROXY_PASSWORD"] = password
        try:
            capsys.readouterr()
            code = await trio.to_thread.run_sync(main, [*_replay_argv(path, port), "--json"])
            out = capsys.readouterr().out
        finally:
            del os.environ["POPPROXY_PASSWORD"]
        nursery.cancel_scope.cancel()
    report = json.loads(out)
    assert code == 0, report
    assert password not in out
