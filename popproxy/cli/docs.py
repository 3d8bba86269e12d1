"""``popproxy docs``: the documentation installed with popproxy, listed or shown."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from importlib.abc import Traversable

from popproxy.errors import UsageError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "docs",
        help="the documentation installed with popproxy",
        description="List the documents installed with popproxy (the same as docs/ in its "
        "source), or show one: formats, rule and filter grammars, TLS, replay.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="a document, e.g. replay or faults")
    p.add_argument("--path", action="store_true", help="print where the file is, not its text")
    p.set_defaults(run=run)


def folder() -> Traversable:
    """The installed docs: ``popproxy/docs`` (in a source checkout, a link to ``docs/``)."""
    return resources.files("popproxy") / "docs"


def documents() -> dict[str, Traversable]:
    """Name (file name without .md) -> file, for every document installed."""
    found = {}
    for entry in folder().iterdir():
        if entry.is_file() and entry.name.endswith((".md", ".json")):
            found[entry.name.removesuffix(".md")] = entry
    return dict(sorted(found.items()))


def _title(doc: Traversable) -> str:
    if not doc.name.endswith(".md"):
        return doc.name
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return doc.name


def run(args: argparse.Namespace) -> int:
    docs = documents()
    if args.name is None:
        width = max(len(name) for name in docs)
        for name, doc in docs.items():
            print(f"{name:<{width}}  {str(doc) if args.path else _title(doc)}")
        return 0
    name = args.name.removesuffix(".md").removeprefix("docs/")
    if name not in docs:
        raise UsageError(f"no document {args.name!r}: one of {', '.join(docs)}")
    doc = docs[name]
    if args.path:
        print(doc)
        return 0
    text = doc.read_text(encoding="utf-8")
    if sys.stdout.isatty() and doc.name.endswith(".md"):
        from rich.markdown import Markdown

        from popproxy.views.theme import make_console

        make_console().print(Markdown(text))  # the project's own text: no peer bytes
    else:
        sys.stdout.write(text)
    return 0
