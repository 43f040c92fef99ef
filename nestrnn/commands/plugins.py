"""``nestrnn plugins``: what is installed, what each plugin registered, and what failed."""

from __future__ import annotations

import argparse
import json

from nestrnn.output import stdout_to_stderr
from nestrnn.registry import DISABLE_ENV, get_registry

HELP = "list loaded plugins, what they registered, and plugins that failed to load"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr():  # what plugins print while they load: not into the listing
        report = get_registry().report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for plugin in report["plugins"]:
        origin = plugin["distribution"] or "script"
        version = f" {plugin['version']}" if plugin["version"] else ""
        kind = " (built-in)" if plugin["builtin"] else ""
        print(f"{plugin['name']}  [{origin}{version}]{kind}")
        for what, names in plugin["registered"].items():
            if names:
                print(f"    {what}: {', '.join(names)}")
    if report["external_plugins_disabled"]:
        print(f"external plugins are disabled ({DISABLE_ENV} is set)")
    for conflict in report["conflicts"]:
        providers = " and ".join(conflict["providers"])
        print(f"CONFLICT {conflict['kind']} {conflict['name']!r}: registered by {providers}")
    for failure in report["failures"]:
        origin = failure["distribution"] or "unknown distribution"
        print(f"FAILED {failure['name']} [{origin}]: {failure['error']}")
    return 0
