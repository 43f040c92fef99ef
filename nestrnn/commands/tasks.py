"""``nestrnn tasks``: list the registered tasks."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from nestrnn.registry import Entry, Registry

HELP = "list the registered tasks (built-in and from plugins)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (with every task option)")


def _options(factory: Any) -> list[dict[str, Any]]:
    from nestrnn.config import field_comments

    options = getattr(factory, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return []
    options = cast(type, options)
    comments = field_comments(options)
    instance = options()
    return [
        {"name": f.name, "default": getattr(instance, f.name), "help": comments.get(f.name, "")}
        for f in dataclasses.fields(options)
        if f.name != "name"
    ]


def _json(registry: Registry, entries: list[Entry]) -> dict[str, Any]:
    """What ``nestrnn tasks --json`` prints: every task with its options, and the conflicts."""
    return {
        "tasks": [
            {
                "name": e.name,
                "description": e.description,
                "kind": getattr(e.factory, "kind", None),
                "primary_metric": getattr(e.factory, "primary_metric", None),
                "provider": e.provider.describe(),
                "builtin": e.provider.builtin,
                "options": _options(e.factory),
            }
            for e in entries
        ],
        "conflicts": [
            {"name": name, "providers": [p.describe() for p in providers]}
            for (kind, name), providers in sorted(registry.conflicts.items())
            if kind == "task"
        ],
    }


def run(args: argparse.Namespace) -> int:
    from nestrnn.output import stdout_to_stderr
    from nestrnn.registry import get_registry

    registry = get_registry()
    with stdout_to_stderr():  # what plugins print while they load: not into the listing
        entries = [registry.entries["task"][n] for n in registry.names("task")]
        data = _json(registry, entries) if args.json else None
    failures = registry.failures
    if data is not None:
        print(json.dumps(data, indent=2, default=str))
        return 0
    width = max((len(e.name) for e in entries), default=4)
    for e in entries:
        origin = "" if e.provider.builtin else f"  [{e.provider.describe()}]"
        print(f"{e.name:<{width}}  {e.description}{origin}")
    for (kind, name), providers in sorted(registry.conflicts.items()):
        if kind == "task":
            listed = " and ".join(p.describe() for p in providers)
            print(f"{name:<{width}}  unusable: registered by {listed}")
    if failures:
        print(f"({len(failures)} plugin(s) failed to load; `nestrnn plugins` says why)")
    print("\nuse one with: nestrnn train task.name=NAME (options: nestrnn tasks --json)")
    return 0
