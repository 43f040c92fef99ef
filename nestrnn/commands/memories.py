"""``nestrnn memories``: the registered memory functions."""

from __future__ import annotations

import argparse
import json

from nestrnn.registry import get_registry

HELP = "list the registered memory functions"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    rows = [
        {
            "name": entry.name,
            "description": entry.description,
            "provider": entry.provider.plugin,
            "distribution": entry.provider.distribution,
        }
        for entry in (registry.get("memory", name) for name in registry.names("memory"))
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=0)
    for row in rows:
        print(
            f"{row['name']:<{width}}  {row['description']}  [{row['distribution'] or row['provider']}]"
        )
    return 0
