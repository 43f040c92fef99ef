"""``nestrnn memories``: the registered memory functions."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nestrnn.output import stdout_to_stderr
from nestrnn.registry import get_registry

HELP = "list the registered memory functions"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def _rows() -> list[dict[str, Any]]:
    """The usable memory functions, by name, with their providers."""
    registry = get_registry()
    return [
        {
            "name": entry.name,
            "description": entry.description,
            "provider": entry.provider.plugin,
            "distribution": entry.provider.distribution,
        }
        for entry in (registry.get("memory", name) for name in registry.names("memory"))
    ]


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr():  # what plugins print while they load: not into the listing
        rows = _rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=0)
    for row in rows:
        print(
            f"{row['name']:<{width}}  {row['description']}  [{row['distribution'] or row['provider']}]"
        )
    return 0
