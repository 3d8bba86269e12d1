"""Record a real client's session through the in-process proxy, for replay tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record
from tests.support.captures import wait_ended


def record(
    upstream: tuple[str, int],
    out_dir: Path,
    client: Callable[[str, int], Any],
    *,
    timeout: float = 30.0,
) -> tuple[Path, Any]:
    """Run ``client(host, port)`` (sync, in a thread) through popproxy; return its capture."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.popcap"))
    result: list[Any] = []

    async def main() -> None:
        config = ProxyConfig(
            upstream=upstream, listen=("127.0.0.1", 0), out_dir=out_dir, linger=0.2
        )
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                addresses = await nursery.start(partial_serve, config)
                host, port = addresses[0]
                result.append(await trio.to_thread.run_sync(client, host, port))
                await wait_ended(out_dir, 1, before)
                nursery.cancel_scope.cancel()

    trio.run(main)
    new = sorted(set(out_dir.glob("*.popcap")) - before)
    assert len(new) == 1, new
    return new[0], result[0]


async def partial_serve(
    config: ProxyConfig, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    await serve_record(config, None, announce=False, task_status=task_status)
