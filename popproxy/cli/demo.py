"""``popproxy demo``: a whole record session on this machine, no server and no network needed."""

from __future__ import annotations

import argparse
import poplib
from importlib import resources
from pathlib import Path
from typing import Any

import trio
from rich.text import Text

from popproxy.core.transcript import Item, SessionSummary
from popproxy.proxy.config import ProxyConfig, capture_dir
from popproxy.proxy.server import serve_record
from popproxy.replay.fake import ServeConfig, serve_replay
from popproxy.replay.script import load_session
from popproxy.views.live import NORMAL, LiveView
from popproxy.views.theme import make_console

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"  # public on purpose: the demo mailbox holds only test messages
TIMEOUT = 15.0

WHAT_NEXT = """\
What next:
  # the transcript again (add --bodies, --json or --raw)
  popproxy show {capture}
  # a fake server playing it to your own mail client
  popproxy serve {capture} --listen 127.0.0.1:1110
  # record your client against your server (point the client at 127.0.0.1:1110)
  popproxy record --upstream HOST:110"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="see popproxy record a POP3 session, offline, in seconds",
        description="Start a fake POP3 server playing a recorded Dovecot "
        "session, the recording proxy in front of it, and a poplib "
        "client: the session shows live and is written as a capture.",
    )
    p.add_argument(
        "--out",
        default="captures",
        metavar="DIR",
        help="folder for the capture file (default captures/)",
    )
    p.set_defaults(run=run)


def demo_client(host: str, port: int, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The demo's mail client: the session the packaged capture recorded (poplib)."""
    client = poplib.POP3(host, port, timeout=timeout)
    try:
        result: dict[str, Any] = {"capa": client.capa()}
        client.user(DEMO_USER)
        client.pass_(DEMO_PASSWORD)
        result["stat"] = client.stat()
        result["list"] = client.list()[1]
        result["uidl"] = client.uidl()[1]
        result["top"] = client.top(1, 0)[1]
        result["messages"] = [client.retr(n)[1] for n in range(1, result["stat"][0] + 1)]
        result["dele"] = client.dele(1)
        result["quit"] = client.quit()
        return result
    finally:
        client.close()


class _DemoView:
    """The live view, plus what the demo needs to know: the capture path and the end."""

    def __init__(self, live: LiveView) -> None:
        self.live = live
        self.detail = live.detail
        self.path: Path | None = None
        self.done = trio.Event()

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self.path = path
        self.live.started(number, peer, "fake server (packaged demo capture)", path)

    def items(self, number: int, items: list[Item]) -> None:
        self.live.items(number, items)

    def ended(
        self, number: int, how: str, error: str | None, duration: float, session: SessionSummary
    ) -> None:
        self.live.ended(number, how, error, duration, session)
        self.done.set()

    def failed(self, number: int, peer: str, reason: str) -> None:
        self.live.failed(number, peer, reason)
        self.done.set()


def run(args: argparse.Namespace) -> int:
    out = capture_dir(args.out)
    console = make_console()
    console.print(
        Text(
            "popproxy demo: a poplib client → popproxy record → a fake POP3 server "
            "playing a recorded Dovecot session (all on 127.0.0.1, no network)",
            style="bold",
        )
    )
    live = LiveView(console, mode=NORMAL)
    view = _DemoView(live)
    try:
        with resources.as_file(resources.files("popproxy").joinpath("data/demo.popcap")) as cap:
            session = load_session(cap)
        trio.run(_demo, session, out, view)
    except (OSError, poplib.error_proto, trio.TooSlowError) as exc:
        live.close()
        console.print(
            Text(f"popproxy demo: failed: {exc or type(exc).__name__}", style="pop.error")
        )
        return 2
    live.close()
    capture = view.path or out
    console.print()
    console.print(Text(f"capture written: {capture}", style="pop.ok"))
    console.print(WHAT_NEXT.format(capture=capture), highlight=False, soft_wrap=True)
    return 0


async def _demo(session: Any, out: Path, view: _DemoView) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            fake = ServeConfig(
                sessions=[session], listen=("127.0.0.1", 0), password=DEMO_PASSWORD, timeout=TIMEOUT
            )
            upstream = (await nursery.start(_serve_fake, fake))[0]
            config = ProxyConfig(
                upstream=upstream,
                listen=("127.0.0.1", 0),
                out_dir=out,
                linger=0.5,
                connect_timeout=TIMEOUT,
            )
            host, port = (await nursery.start(_serve_proxy, config, view))[0]
            await trio.to_thread.run_sync(demo_client, host, port)
            await view.done.wait()
            nursery.cancel_scope.cancel()


async def _serve_fake(
    config: ServeConfig, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    await serve_replay(config, None, announce=False, task_status=task_status)


async def _serve_proxy(
    config: ProxyConfig,
    view: _DemoView,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_record(config, view, announce=False, task_status=task_status)
