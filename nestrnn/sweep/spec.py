"""The sweep spec: a YAML file that names a base run, fixed overrides and a search space over
dotted config keys. Everything is checked here, before anything runs: a mistake is one
:class:`SpecError` line saying what and where (``spec.yaml: space.optim.lr: ...``).

Keys (all but ``space`` optional)::

    base: configs/x.yaml | a bundled config name      # like ``nestrnn train -c``; a relative
                                                       # path beside the spec file wins
    overrides: {KEY: VALUE, ...}                       # fixed for every trial
    space:
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true}   # optional step: 0.1
      model.num_layers: {int: [1, 3]}                  # optional step, log
      model.family: {choice: [nlstm, stacked_lstm]}
      memory: {memories: [nested, {name: nested, depth: 3}, lstm]}   # or memory: all
    sampler: tpe | random | grid
    trials: 8            # grid: default every combination
    seeds: [0, 1, 2]     # each trial runs once per seed; its value is the mean
    metric: null         # default: the task's primary validation metric
    direction: null      # minimize | maximize; default from the task
    pruner: none | median | {name: median|percentile|threshold, OPTION: VALUE, ...}
    heartbeat_s: 10      # a worker's trial is failed (and retried) after 3 missed heartbeats
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from nestrnn.config import FAMILIES, ConfigError, load_config, task_class, to_container
from nestrnn.errors import UserError, one_line

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "percentile", "threshold")
DIRECTIONS = ("minimize", "maximize")
KEYS = (
    "base",
    "overrides",
    "space",
    "sampler",
    "trials",
    "seeds",
    "metric",
    "direction",
    "pruner",
    "heartbeat_s",
)
#: the search-space key whose choices are whole memories (model.memory, model.depth, model.family)
MEMORY_KEY = "memory"
#: the depths ``memory: all`` tries for a memory function that takes a depth
ALL_DEPTHS = (2, 3)
DEFAULT_TRIALS = 8


class SpecError(UserError):
    """A sweep spec that cannot run (one line: the file, the place, what is wrong)."""


@dataclass
class Param:
    """One dimension of the search space."""

    key: str  # a dotted config key, or ``memory``
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def grid(self) -> list[Any]:
        """Every value a grid sampler visits."""
        if self.kind == "choice":
            return list(self.choices)
        step = self.step if self.step is not None else 1
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else values


@dataclass
class Spec:
    """A checked sweep spec; ``memories`` maps each memory choice's label to its overrides."""

    path: Path
    raw: dict[str, Any]
    base: str | None
    overrides: list[str]
    params: list[Param]
    memories: dict[str, dict[str, Any]]
    sampler: str
    trials: int
    seeds: list[int]
    metric: str
    direction: str
    pruner: dict[str, Any]
    heartbeat_s: int
    task: str

    def trial_overrides(self, values: dict[str, Any]) -> list[str]:
        """``KEY=VALUE`` overrides of one trial's sampled ``values`` (a memory label expands)."""
        out: list[str] = []
        for key, value in values.items():
            pairs = self.memories[value].items() if key == MEMORY_KEY else [(key, value)]
            out += [f"{k}={json.dumps(v)}" for k, v in pairs]
        return out

    def config(self, values: dict[str, Any], seed: int, threads: int) -> DictConfig:
        """The full configuration of one (trial, seed) run."""
        extra = [f"train.seed={seed}", f"train.threads={threads}", "train.progress=false"]
        files = [self.base] if self.base else []
        return load_config(files, [*self.overrides, *self.trial_overrides(values), *extra])

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.params)

    def resolved(self) -> dict[str, Any]:
        """The spec with its defaults filled in (what ``sweep.yaml`` holds)."""
        raw = dict(self.raw)
        raw.update(
            sampler=self.sampler,
            trials=self.trials,
            seeds=self.seeds,
            metric=self.metric,
            direction=self.direction,
            pruner=self.pruner,
            heartbeat_s=self.heartbeat_s,
        )
        return raw


def _fail(path: Path, where: str, what: str) -> SpecError:
    return SpecError(f"{path}: {where}: {what}")


def load_spec(path: str | Path, cli_overrides: list[str], trials: int | None = None) -> Spec:
    """Read and check the spec at ``path`` (``cli_overrides`` win over its ``overrides``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SpecError(f"cannot read sweep spec {path}: {one_line(str(error))}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep spec is a mapping with a 'space' key")
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (keys: {', '.join(KEYS)})"
            raise _fail(path, str(key), f"unknown sweep key{hint}")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise _fail(path, "base", f"must be a config file or bundled config name, got {base!r}")
    if base is not None and (Path(path).parent / base).is_file() and not Path(base).is_absolute():
        base = str((Path(path).parent / base).resolve())  # a file beside the spec
    fixed = raw.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise _fail(path, "overrides", "must be a mapping of KEY: VALUE")
    overrides = [f"{k}={json.dumps(v)}" for k, v in fixed.items()] + list(cli_overrides)
    try:
        config = load_config([base] if base else [], overrides)
    except ConfigError as error:
        raise _fail(path, "base/overrides", str(error)) from None
    known = _leaf_keys(to_container(config))

    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise _fail(path, "space", "needs at least one KEY: distribution")
    params: list[Param] = []
    memories: dict[str, dict[str, Any]] = {}
    if MEMORY_KEY in space:
        clash = [k for k in space if k in ("model.family", "model.memory", "model.depth")]
        if clash:
            raise _fail(
                path,
                f"space.{clash[0]}",
                "the memory search space sets it already; give it in a memory choice instead",
            )
    for key, dist in space.items():
        where = f"space.{key}"
        if key == MEMORY_KEY:
            memories = _memory_choices(path, where, dist, config)
            params.append(Param(key, "choice", choices=list(memories)))
            continue
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise _fail(path, where, f"unknown config key{hint}")
        param = _param(path, where, key, dist)
        for value in _probe_values(param):  # each value must make a valid config
            try:
                load_config([base] if base else [], [*overrides, f"{key}={json.dumps(value)}"])
            except ConfigError as error:
                raise _fail(path, where, f"value {value!r}: {error}") from None
        params.append(param)

    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _fail(path, "sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    spec = Spec(
        path,
        raw,
        base,
        overrides,
        params,
        memories,
        sampler,
        0,
        [],
        "",
        "",
        {},
        0,
        config.task.name,
    )
    if sampler == "grid":
        for p in params:
            if p.kind == "float" and p.step is None:
                raise _fail(path, f"space.{p.key}", "a grid sampler needs a step for a float")
    count = trials if trials is not None else raw.get("trials")
    if count is None:
        count = spec.grid_size() if sampler == "grid" else DEFAULT_TRIALS
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _fail(path, "trials", f"must be a positive integer, got {count!r}")
    spec.trials = count
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise _fail(path, "seeds", f"must be a list of distinct integers >= 0, got {seeds!r}")
    spec.seeds = seeds
    task = task_class(config.task.name)
    spec.metric = raw.get("metric") or task.primary_metric
    if not isinstance(spec.metric, str):
        raise _fail(path, "metric", f"must be a metric name, got {spec.metric!r}")
    direction = raw.get("direction") or ("maximize" if task.higher_is_better else "minimize")
    if direction not in DIRECTIONS:
        raise _fail(path, "direction", f"must be minimize or maximize, got {direction!r}")
    spec.direction = direction
    spec.pruner = _pruner(path, raw.get("pruner", "none"))
    beat = raw.get("heartbeat_s", 10)
    if isinstance(beat, bool) or not isinstance(beat, int) or beat < 1:
        raise _fail(path, "heartbeat_s", f"must be a whole number of seconds >= 1, got {beat!r}")
    spec.heartbeat_s = beat
    return spec


def _leaf_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in node.items():
        if isinstance(value, dict) and key != "memory":
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param(path: Path, where: str, key: str, dist: Any) -> Param:
    if not isinstance(dist, dict):
        raise _fail(path, where, f"must be {{float|int|choice: ...}}, got {dist!r}")
    kinds = [k for k in ("float", "int", "choice") if k in dist]
    if len(kinds) != 1:
        raise _fail(
            path, where, "needs exactly one of float: [low, high], int: [low, high], choice: [...]"
        )
    kind = kinds[0]
    extra = set(dist) - {kind, "log", "step"} if kind != "choice" else set(dist) - {kind}
    if extra:
        raise _fail(path, where, f"unknown option {sorted(extra)[0]!r} for a {kind} distribution")
    if kind == "choice":
        choices = dist["choice"]
        if not isinstance(choices, list) or not choices:
            raise _fail(path, where, "choice needs a non-empty list of values")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise _fail(path, where, "choice lists a value twice")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise _fail(path, where, "choice values must be numbers, strings, booleans or null")
        return Param(key, "choice", choices=choices)
    bounds = dist[kind]
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(map(_number, bounds))
        or bounds[0] >= bounds[1]
    ):
        raise _fail(path, where, f"{kind} needs [low, high] with low < high, got {bounds!r}")
    if kind == "int" and not all(isinstance(b, int) for b in bounds):
        raise _fail(path, where, f"int needs integer bounds, got {bounds!r}")
    log = dist.get("log", False)
    step = dist.get("step")
    if not isinstance(log, bool):
        raise _fail(path, where, f"log must be true or false, got {log!r}")
    if log and bounds[0] <= 0:
        raise _fail(path, where, f"log needs a low bound > 0, got {bounds[0]!r}")
    if step is not None and (
        not _number(step) or step <= 0 or (kind == "int" and not isinstance(step, int))
    ):
        raise _fail(path, where, f"step must be a {kind} > 0, got {step!r}")
    if step is not None and log:
        raise _fail(path, where, "log and step cannot go together")
    return Param(
        key,
        kind,
        float(bounds[0]) if kind == "float" else bounds[0],
        float(bounds[1]) if kind == "float" else bounds[1],
        log,
        step,
    )


def _probe_values(param: Param) -> list[Any]:
    return list(param.choices) if param.kind == "choice" else [param.low, param.high]


def _pruner(path: Path, raw: Any) -> dict[str, Any]:
    spec = {"name": raw} if isinstance(raw, str) or raw is None else raw
    if not isinstance(spec, dict) or spec.get("name", "none") not in PRUNERS:
        raise _fail(
            path,
            "pruner",
            f"must be one of {', '.join(PRUNERS)} or {{name: ..., OPTION: VALUE}}, got {raw!r}",
        )
    spec = {"name": spec.get("name") or "none", **{k: v for k, v in spec.items() if k != "name"}}
    if spec["name"] == "none" and len(spec) > 1:
        raise _fail(path, "pruner", "'none' takes no options")
    try:
        make_pruner(spec)
    except (TypeError, ValueError) as error:
        raise _fail(path, "pruner", f"{spec['name']}: {one_line(str(error))}") from None
    return spec


def make_pruner(spec: dict[str, Any]) -> Any:
    """The Optuna pruner of a checked ``pruner`` spec: ``{name: ..., OPTION: VALUE}``."""
    import optuna

    classes = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "threshold": optuna.pruners.ThresholdPruner,
    }
    cls = classes.get(str(spec["name"]))
    if cls is None:
        return optuna.pruners.NopPruner()
    options = {k: v for k, v in spec.items() if k != "name"}
    inspect.signature(cls).bind(**options)
    return cls(**options)


def _memory_choices(path: Path, where: str, dist: Any, config: DictConfig) -> dict[str, Any]:
    """The memory search space: each choice's label and its model.* overrides."""
    from nestrnn.memory.build import accepts_option, build_memory
    from nestrnn.registry import RegistryError, get_memory, memory_names

    if dist == "all" or (isinstance(dist, dict) and dist.get("memories") == "all"):
        items: list[Any] = []
        seen: set[Any] = set()
        for name in memory_names():  # another name for the same memory is the same choice
            factory = get_memory(name).factory
            if factory in seen:
                continue
            seen.add(factory)
            depths = ALL_DEPTHS if accepts_option(factory, "depth") else (None,)
            items += [{"name": name, "depth": d} if d else name for d in depths]
    elif (
        isinstance(dist, dict) and set(dist) == {"memories"} and isinstance(dist["memories"], list)
    ):
        items = dist["memories"]
    else:
        raise _fail(
            path,
            where,
            "must be {memories: [NAME, {name: NAME, depth: D, OPTION: "
            f"VALUE}}, ...]}} or all, got {dist!r}",
        )
    if not items:
        raise _fail(path, where, "memories needs at least one memory")
    choices: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(items):
        at = f"{where}.memories[{index}]"
        overrides: dict[str, Any]
        if isinstance(item, str) and item in FAMILIES and item != "nlstm":  # a baseline LSTM
            label, overrides = item, {"model.family": item, "model.memory": None}
        else:
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _fail(path, at, f"must be a memory name or {{name: ..., ...}}, got {item!r}")
            options = {k: v for k, v in item.items() if k not in ("name", "label", "depth")}
            name, depth = item["name"], item.get("depth")
            if depth is not None and (
                isinstance(depth, bool) or not isinstance(depth, int) or depth < 1
            ):
                raise _fail(path, at, f"depth must be an integer >= 1, got {depth!r}")
            try:
                factory = get_memory(name).factory
            except RegistryError as error:
                raise _fail(path, at, one_line(str(error))) from None
            if depth is not None and not accepts_option(factory, "depth"):
                raise _fail(path, at, f"memory {name!r} takes no depth")
            memory = {"name": name, **options, **({"depth": depth} if depth else {})}
            try:
                build_memory(memory, 2)
            except (TypeError, ValueError, RegistryError) as error:
                raise _fail(path, at, one_line(str(error))) from None
            overrides = {
                "model.family": "nlstm",
                "model.memory": memory if options or name != "nested" else None,
                "model.depth": depth or config.model.depth,
            }
            label = item.get("label") or _memory_label(name, depth, options)
        if label in choices:
            raise _fail(path, at, f"a second choice labelled {label!r}; give one a label: ...")
        choices[str(label)] = overrides
    return choices


def _memory_label(name: str, depth: int | None, options: dict[str, Any]) -> str:
    parts = [name] + ([f"d{depth}"] if depth else [])
    parts += [f"{k}={v}" for k, v in sorted(options.items())]
    return "-".join(parts)


def all_grid(spec: Spec) -> dict[str, list[Any]]:
    """The grid sampler's search space."""
    return {p.key: p.grid() for p in spec.params}
