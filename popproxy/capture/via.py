"""A capture header's ``via``: how the session's upstream was chosen (docs/capture-format.md)."""

from __future__ import annotations

from typing import Any

FIXED, ROUTE, SOCKS5, SERVE = "fixed", "route", "socks5", "serve"


def via_of(header: dict[str, Any]) -> dict[str, Any]:
    """The header's "via" (captures written before it existed: fixed)."""
    via = header.get("via")
    return via if isinstance(via, dict) else {"how": FIXED}


def describe_via(header: dict[str, Any]) -> str:
    """One short label: ``fixed``, ``route 127.0.0.1:1995=…``, ``SOCKS5 user alice``."""
    via = via_of(header)
    how = via.get("how")
    if how == ROUTE:
        return f"route {via.get('route', '?')}"
    if how == SOCKS5:
        user = via.get("user")
        return "SOCKS5" + (f" user {user}" if user else "")
    if how == SERVE:  # popproxy itself was the server
        played = via.get("played")
        return "popproxy serve, " + (f"playing {played}" if played else "the mailbox")
    return str(how or FIXED)


def via_text(header: dict[str, Any]) -> str:
    """The "via" as one searchable line: ``fixed``,
    ``route route=127.0.0.1:1995=pop.b.org:995/tls``, ``socks5 target=h:995 user=alice``."""
    via = via_of(header)
    words = [str(via.get("how", FIXED))]
    words += [f"{k}={v}" for k, v in via.items() if k != "how" and v is not None]
    return " ".join(words)
