"""Finding run directories and grouping them into configurations (the seeds of one setting).

A run directory is what ``nestrnn train`` writes; a folder holding ``config.yaml`` is taken for
one and not descended into. It counts when it also holds ``summary.json`` (the run finished);
one without it, or one whose last record is ``stopped``, is skipped with the reason.

Two runs are repeated measures of one configuration when their config.yaml files are equal
once ``train.seed`` and the keys that do not change the result (:data:`IGNORED`) are removed.
A configuration's label is the ``key=value`` pairs that differ between the configurations
compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from nestrnn.engine import runfiles
from nestrnn.engine.rundir import CONFIG, METRICS, SUMMARY, read_records, read_summary
from nestrnn.errors import UserError

#: keys left out of a configuration's identity: the seed, and what does not change the result
IGNORED = (
    "train.seed",
    "train.device",
    "train.threads",
    "train.progress",
    "train.log_every",
    "train.checkpoint_every",
)
IGNORED_PREFIXES = ("log.",)


@dataclass
class Run:
    """One run directory: its flattened config, its summary (None: skipped, see ``skipped``)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    skipped: str | None = None

    @property
    def seed(self) -> int | None:
        seed = self.config.get("train.seed")
        return seed if isinstance(seed, int) else None

    def identity(self) -> tuple[tuple[str, str], ...]:
        kept = _kept(self.config)
        return tuple(
            sorted((key, json.dumps(value, sort_keys=True)) for key, value in kept.items())
        )


@dataclass
class Configuration:
    """The runs of one configuration, in the order found; ``label`` is set by :func:`group`."""

    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    differing: dict[str, Any] = field(default_factory=dict)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    data = runfiles.read_bytes(path / CONFIG, UserError)
    try:
        loaded = OmegaConf.to_container(OmegaConf.create(data.decode("utf-8")), resolve=True)
    except Exception as error:
        raise UserError(f"{path / CONFIG} is not a readable config ({error})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path / CONFIG} is not a config (a YAML mapping)")
    return flatten(cast(dict[str, Any], loaded))


def load_run(path: Path) -> Run:
    """The run at ``path``; a run that did not finish is returned with the reason it is skipped."""
    try:
        config = _read_config(path)
        summary = read_summary(path / SUMMARY)
        records = read_records(path / METRICS) if summary is not None else []
    except UserError as error:
        return Run(path, {}, None, f"unreadable: {error}")
    if summary is None:
        return Run(path, config, None, f"unfinished: no {SUMMARY}")
    if records and records[-1].get("event") in ("stopped", "diverged"):
        what = records[-1]["event"]
        return Run(path, config, None, f"{what} at step {records[-1].get('step')}")
    return Run(path, config, summary)


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run directory at or under ``paths``, in the order given (sorted within a folder);
    a path that does not exist is a UserError. Links to folders are not followed."""
    found: list[Run] = []
    seen: set[Path] = set()
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise UserError(f"{root} is not a directory" if root.exists() else f"no {root}")
        for folder in _walk(root):
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                found.append(load_run(folder))
    return found


def _walk(root: Path) -> list[Path]:
    if os.path.lexists(root / CONFIG):
        return [root]
    folders: list[Path] = []
    try:
        children = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as error:
        raise UserError(f"cannot read {root}: {error.strerror or error}") from None
    for entry in children:
        if entry.is_dir(follow_symlinks=False):
            folders += _walk(Path(entry.path))
    return folders


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return "null" if value is None else str(value)


def group(runs: Sequence[Run]) -> list[Configuration]:
    """Finished runs grouped into configurations, in the order of their first run, each labelled
    with the keys whose values differ between the configurations."""
    by_identity: dict[tuple[tuple[str, str], ...], Configuration] = {}
    for run in runs:
        if run.summary is None:
            continue
        by_identity.setdefault(run.identity(), Configuration(_kept(run.config))).runs.append(run)
    configurations = list(by_identity.values())
    keys = sorted({key for c in configurations for key in c.config})
    differing = [
        key
        for key in keys
        if len({json.dumps(c.config.get(key, "<unset>"), sort_keys=True) for c in configurations})
        > 1
    ]
    for c in configurations:
        c.differing = {key: c.config.get(key) for key in differing}
        c.label = " ".join(f"{key}={_show(value)}" for key, value in c.differing.items())
        if not c.label:  # one configuration: nothing differs, say what it is
            c.label = f"model.family={_show(c.config.get('model.family'))}"
    return configurations


def _kept(config: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in config.items()
        if key not in IGNORED and not key.startswith(IGNORED_PREFIXES)
    }
