"""How each connection's upstream is chosen (fixed, a route, a SOCKS target), per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from popproxy.capture.via import FIXED, ROUTE, SOCKS5, describe_via, via_of
from popproxy.core.transcript import Item, SessionSummary
from popproxy.proxy.config import ProxyConfig, Route, Security, format_hostport
from popproxy.proxy.view import SessionView

__all__ = ["LabelledView", "describe_via", "fixed_config", "route_config", "socks_config", "via_of"]


def fixed_config(config: ProxyConfig) -> ProxyConfig:
    """The ``--listen``/``--upstream`` pair's sessions."""
    return _with_via(config, {"how": FIXED})


def route_config(config: ProxyConfig, route: Route) -> ProxyConfig:
    """A ``--route``'s sessions: its upstream and TLS mode replace the command line's."""
    tls = route.security is Security.TLS
    derived = dataclasses.replace(
        config,
        upstream=route.upstream,
        listen=route.listen,
        listen_tls=tls,
        upstream_tls=tls,
        upstream_stls=route.security is Security.STLS,
    )
    return _with_via(derived, {"how": ROUTE, "route": route.text})


def socks_config(
    config: ProxyConfig, host: str, port: int, *, tls: bool, user: str | None
) -> ProxyConfig:
    """One SOCKS5 connection's session: the CONNECT target is the upstream."""
    derived = dataclasses.replace(
        config, upstream=(host, port), listen_tls=tls, upstream_tls=tls, upstream_stls=False
    )
    via: dict[str, Any] = {"how": SOCKS5, "target": format_hostport(host, port), "user": user}
    return _with_via(derived, via)


def _with_via(config: ProxyConfig, via: dict[str, Any]) -> ProxyConfig:
    return dataclasses.replace(config, extra_header={**config.extra_header, "via": via})


class LabelledView:
    """A session's view with its upstream labelled by how it was chosen (the live view
    shows ``→ pop.b.org:995 (route 127.0.0.1:1995=…)``)."""

    def __init__(self, view: SessionView, label: str) -> None:
        self.view = view
        self.label = label
        self.detail = view.detail

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self.view.started(number, peer, f"{upstream} ({self.label})", path)

    def items(self, number: int, items: list[Item]) -> None:
        self.view.items(number, items)

    def ended(
        self, number: int, how: str, error: str | None, duration: float, session: SessionSummary
    ) -> None:
        self.view.ended(number, how, error, duration, session)

    def failed(self, number: int, peer: str, reason: str) -> None:
        self.view.failed(number, peer, reason)
