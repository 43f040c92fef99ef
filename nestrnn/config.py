"""Run configuration: dataclass schemas (one comment per field) merged with YAML and overrides.

A run's configuration has five sections::

    task:   which task (``task.name``) and its own options (each task's ``Options`` dataclass)
    model:  the recurrent model family, its size and initialisation   (:class:`ModelConfig`)
    optim:  optimizer, gradient clipping and learning-rate schedule   (:class:`OptimConfig`)
    train:  epochs, batching, evaluation, checkpoints, device, seed  (:class:`TrainConfig`)
    log:    where the run's metrics go besides metrics.jsonl           (:class:`LogConfig`)

Values are resolved in this order, later ones winning:

1. the defaults in the dataclasses below (they describe ``nestrnn train`` with no arguments);
2. the chosen task's ``config_defaults`` (e.g. a sensible ``train.bptt`` for a language model);
3. each YAML file given with ``-c`` (``configs/*.yaml``), in order;
4. ``key=value`` overrides on the command line (``train.epochs=3 model.family=lstm``).

Unknown keys and values of the wrong type are one-line :class:`ConfigError` messages naming the key,
where it came from and, where there is one, a close match (``did you mean 'optim.lr'?``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import inspect
import json
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nestrnn.errors import UserError, one_line
from nestrnn.init import RECURRENT_INITS
from nestrnn.layer import LAYER_BACKENDS

DEFAULT_TASK = "adding"
FAMILIES = ("nlstm", "lstm", "stacked_lstm")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "plateau", "step", "cosine")
LSTM_IMPLS = ("torch", "nestrnn")
MODEL_BACKENDS = LAYER_BACKENDS
#: the package that holds the bundled experiment configs (the repository's ``configs/`` folder)
CONFIGS_PACKAGE = "nestrnn.configs"
#: deeper nesting is far beyond any experiment and takes minutes to build (Python's recursion
#: limit stops it near 1000)
MAX_DEPTH = 100
#: learning rates and weight decay above this are no experiment (and overflow float32 steps)
MAX_RATE = 1000.0
#: the largest train.seed: torch takes seeds below 2**64, and each rank's seed adds to it
MAX_SEED = 2**63 - 1
#: model settings a resumed run, ``eval``, ``sample`` and ``viz`` may change (every other
#: ``model.*`` key is fixed by the checkpoint)
MODEL_KEYS_FREE_AFTER_TRAINING = (
    "backend",
    "dropout",
    "lstm_impl",
    "input_dropout",
    "output_dropout",
    "locked_dropout",
    "weight_drop",
    "checkpoint_every",
)


class ConfigError(UserError, ValueError):
    """An invalid configuration: unknown key, wrong type or invalid value (one line)."""


# --------------------------------------------------------------------------- schemas


@dataclass
class ModelConfig:
    family: str = "nlstm"  # nlstm (Nested LSTM) | lstm (one LSTM per layer) | stacked_lstm
    hidden_size: int = 64  # hidden units per layer (ignored when target_params > 0)
    target_params: int = 0  # > 0: solve hidden_size so the whole model has about this many params
    num_layers: int = 1  # recurrent layers (stacked_lstm stacks num_layers * depth LSTM layers)
    depth: int = 2  # nlstm: memory levels per layer (2 = the paper's NLSTM); stacked_lstm: layers
    memory: Any = None  # nlstm: a memory function name or {name: ..., options} (null: nested)
    embedding_dim: int = 0  # token inputs: embedding size (0: same as the hidden size)
    dropout: float = 0.0  # dropout on the recurrent input and output (and between layers)
    forget_bias: float | None = 1.0  # initial forget-gate bias on every level (null: PyTorch init)
    recurrent_init: str = "orthogonal"  # orthogonal | uniform initialisation of recurrent weights
    backend: str = "auto"  # NestedLSTM backend (auto, generic, naive, an op implementation)
    lstm_impl: str = "torch"  # lstm/stacked_lstm: torch (nn.LSTM, cuDNN on GPU) | nestrnn (depth 1)
    input_dropout: float | None = None  # dropout on the recurrent input (null: model.dropout)
    output_dropout: float | None = None  # dropout on the recurrent output (null: model.dropout)
    locked_dropout: bool = False  # one dropout mask per sequence (variational), not per step
    weight_drop: Any = 0.0  # DropConnect on hidden-to-hidden weights: a rate, or one per level
    zoneout_cell: Any = 0.0  # zoneout of the cells: a rate, or one per memory level
    zoneout_hidden: float = 0.0  # zoneout of h
    checkpoint_every: int = 0  # recompute the time loop in segments of N steps in the backward
    layer_norm: Any = False  # layer normalisation inside the cell: a bool, or one per memory level


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 0.005  # peak learning rate
    momentum: float = 0.0  # sgd momentum
    weight_decay: float = 0.0  # L2 weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this value (0: no clipping)
    schedule: str = "constant"  # constant | plateau | step | cosine (see docs/training.md)
    decay: float = 0.5  # plateau/step: multiply the learning rate by this factor
    patience: int = 0  # plateau: epochs without validation improvement before a decay
    decay_start: int = 1  # step: first epoch (1-based) after which the rate decays every epoch
    min_lr: float = 0.0  # the schedule never goes below this learning rate
    warmup_steps: int = 0  # linear warm-up over this many optimizer steps


@dataclass
class TrainConfig:
    epochs: int = 30  # training epochs (evaluation on the validation split after each)
    steps_per_epoch: int = 100  # optimizer steps per epoch (0: one pass over the training data)
    batch_size: int = 64  # sequences per batch (language models: parallel streams)
    bptt: int = 100  # language models: steps per truncated-BPTT chunk (state carried across)
    eval_batch_size: int = 0  # batch size for evaluation (0: same as batch_size)
    eval_max_batches: int = 0  # evaluate on at most this many batches (0: the whole split)
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    early_stopping: int = 0  # stop after this many epochs without validation improvement (0: off)
    seed: int = 0  # seeds torch, numpy, python random and the data order (0 to 2**63 - 1)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch (0: auto, 1 for models under 1M params, else default)
    log_every: int = 20  # optimizer steps between training records in metrics.jsonl
    checkpoint_every: int = 0  # also save last.pt every N steps in an epoch (0: epoch ends only)
    progress: bool = True  # show a tqdm progress bar
    test: bool = True  # at the end, evaluate the best checkpoint on the test split


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard/
    timescales: bool = True  # with a dashboard: each memory level's timescale after each epoch
    loggers: list[str] = field(default_factory=list)  # loggers registered by plugins to enable


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "log": LogConfig,
}

CHOICES: dict[str, Sequence[str]] = {
    "model.family": FAMILIES,
    "model.recurrent_init": RECURRENT_INITS,
    "model.backend": MODEL_BACKENDS,
    "model.lstm_impl": LSTM_IMPLS,
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
}


def task_class(name: str) -> Any:
    """The registered task class ``name``; a ConfigError with close matches when unknown."""
    from nestrnn.registry import RegistryError, get_task, task_names

    try:
        return get_task(name).factory
    except RegistryError as error:
        known = task_names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{error}{hint}") from None


def config_class(options_cls: type) -> type:
    """The schema of a whole run whose task options are ``options_cls``."""
    fields = [("task", options_cls, field(default_factory=options_cls))]
    fields += [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()]
    return dataclasses.make_dataclass("Config", fields)


# --------------------------------------------------------------------------- loading


def bundled_config_names() -> list[str]:
    """The names ``-c NAME`` accepts: the YAML files shipped in :data:`CONFIGS_PACKAGE`."""
    folder = importlib.resources.files(CONFIGS_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(spec: str) -> Path:
    """``spec`` as a path, or the name of a config shipped with the package (``ptb_char``)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config file {spec} is a directory; give a YAML file")
    if not path.suffix and path.parent == Path("."):
        bundled = importlib.resources.files(CONFIGS_PACKAGE) / f"{spec}.yaml"
        if bundled.is_file():
            return Path(str(bundled))
        names = ", ".join(bundled_config_names())
        raise ConfigError(f"config file not found: {spec} (bundled configs: {names})")
    raise ConfigError(f"config file not found: {spec}")


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML config file as a DictConfig; a one-line ConfigError when it is not one."""
    return _load_yaml(Path(path))


def _load_yaml(path: Path) -> DictConfig:
    try:
        text = path.read_text(encoding="utf-8")
        # the shape of the document, without constructing anything: OmegaConf reads a lone
        # string as a key, which would be reported as an unknown config key
        top = yaml.compose(text, Loader=yaml.SafeLoader)
        loaded = OmegaConf.create(text) if top is not None else OmegaConf.create({})
    except Exception as error:  # OSError, UnicodeDecodeError, yaml.YAMLError and friends
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot read {path}: {first}") from None
    if not isinstance(top, (yaml.MappingNode, type(None))) or not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{path} must hold a mapping of sections (task, model, optim, train), "
            f"not {_yaml_kind(top)}"
        )
    return loaded


def _yaml_kind(node: Any) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return f"the value {node.value!r}"
    return "this document"


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings to a config; values are parsed as YAML (``1e-3``, ``true``, ``null``)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.epochs=3)"
            )
    for item in overrides:  # one at a time, so that the error names the culprit
        try:
            OmegaConf.from_dotlist([item])
        except Exception as error:  # OmegaConf's errors, yaml.YAMLError (bad YAML values)
            message = getattr(error, "msg", None) or str(error) or type(error).__name__
            raise ConfigError(f"cannot parse override {item!r}: {one_line(message)}") from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as error:
        message = getattr(error, "msg", None) or str(error) or type(error).__name__
        raise ConfigError(
            f"cannot parse overrides {list(overrides)}: {one_line(message)}"
        ) from None


def _task_name(sources: Sequence[tuple[str, DictConfig]], default: str) -> str:
    name = default
    for _label, source in sources:
        task = source.get("task") if isinstance(source, DictConfig) else None
        if isinstance(task, DictConfig) and task.get("name") is not None:
            name = task.get("name")
        elif task is not None and not isinstance(task, DictConfig):
            raise ConfigError("config key 'task' is a section; set task.name=... instead")
    if not isinstance(name, str):
        raise ConfigError(f"config key 'task.name' must be a string, got {name!r}")
    return name


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | Any = None,
) -> DictConfig:
    """Resolve a run configuration (see the module docstring for the order).

    ``base`` is a saved configuration (a resumed run's) that replaces steps 1-2.
    """
    try:
        return _load_config(files, overrides, base)
    except OmegaConfBaseException as error:  # e.g. a bad ${interpolation} met while checking
        raise ConfigError(f"invalid configuration: {one_line(error.msg)}") from None


def _load_config(
    files: Sequence[str | Path], overrides: Sequence[str], base: Mapping[str, Any] | None
) -> DictConfig:
    sources: list[tuple[str, DictConfig]] = []
    if base is not None:
        sources.append(("the saved run configuration", OmegaConf.create(dict(base))))
    for spec in files:
        path = resolve_config_path(str(spec))
        sources.append((str(path), _load_yaml(path)))
    if overrides:
        sources.append(("the command line", parse_overrides(overrides)))

    name = _task_name(sources, DEFAULT_TASK)
    cls = task_class(name)
    schema_cls = config_class(cls.Options)
    config = OmegaConf.structured(schema_cls)
    defaults = getattr(cls, "config_defaults", None) or {}
    if base is None and defaults:
        sources.insert(0, (f"task {name!r} defaults", OmegaConf.create(dict(defaults))))

    types = field_types(schema_cls)
    for label, source in sources:
        _check_keys(source, config, "", label, sorted(types))
        try:
            config = OmegaConf.merge(config, source)
        except OmegaConfBaseException as error:
            raise ConfigError(_type_error(error, source, label, types)) from None
    OmegaConf.set_struct(config, True)
    try:  # interpolations (${train.seed}) resolve now, so that a bad one is a config error
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the configuration: {one_line(error.msg)}") from None
    check_values(config, schema_cls)
    return config


def _check_keys(
    node: DictConfig, schema: DictConfig, prefix: str, label: str, known: list[str]
) -> None:
    for key in node:
        full = f"{prefix}{key!s}"
        if key not in schema:
            raise ConfigError(f"unknown config key '{full}' (in {label}){_suggest(full, known)}")
        expected = schema[key]
        value = node[key]
        if isinstance(expected, DictConfig):
            if isinstance(value, DictConfig):
                _check_keys(value, expected, f"{full}.", label, known)
            else:
                example = next(iter(expected), "...")
                raise ConfigError(
                    f"config key '{full}' is a section, not a value (in {label}); "
                    f"set its keys, e.g. {full}.{example!s}=..."
                )


def _suggest(full: str, known: list[str]) -> str:
    leaf = full.rsplit(".", 1)[-1]
    close = [k for k in known if k.rsplit(".", 1)[-1] == leaf]  # right key, wrong section
    if not close:
        close = difflib.get_close_matches(full, known, n=1, cutoff=0.6)
    if not close:
        leaves = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known], n=1)
        close = [k for k in known if leaves and k.rsplit(".", 1)[-1] == leaves[0]]
    return f"; did you mean '{close[0]}'?" if close else "; see --print-config for all keys"


def _type_error(
    error: OmegaConfBaseException, source: DictConfig, label: str, types: dict[str, Any]
) -> str:
    key = error.full_key or "?"
    value = OmegaConf.select(source, key, default="?") if key != "?" else "?"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    expected = types.get(key)
    if expected is None:
        return f"invalid value for config key '{key}' (in {label}): {cast(str, error.msg).splitlines()[0]}"
    return f"config key '{key}' must be {_describe_type(expected)}, got {value!r} (in {label})"


def _describe_type(tp: Any) -> str:
    args = typing.get_args(tp)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe_type(inner[0])} or null" if len(inner) == 1 else "a value"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def field_types(schema_cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a schema (``"train.batch_size"``) and its annotated type."""
    hints = typing.get_type_hints(schema_cls)
    found: dict[str, Any] = {}
    for f in dataclasses.fields(schema_cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(field_types(cast(type, tp), f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = tp
    return found


def check_values(config: DictConfig, schema_cls: type | None = None) -> None:
    """Choices and ranges that types alone do not catch."""
    choices = dict(CHOICES)
    task_choices = getattr(type(OmegaConf.to_object(config.task)), "CHOICES", {}) or {}
    choices.update({f"task.{k}": v for k, v in task_choices.items()})
    for key, allowed in choices.items():
        value = OmegaConf.select(config, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            options = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"config key '{key}' must be one of {options}; got {value!r}{hint}")
    positive = [
        "model.hidden_size",
        "model.num_layers",
        "model.depth",
        "train.batch_size",
        "train.bptt",
        "train.log_every",
    ]
    non_negative = [
        "model.target_params",
        "model.embedding_dim",
        "train.epochs",
        "train.steps_per_epoch",
        "train.eval_batch_size",
        "train.eval_max_batches",
        "train.max_steps",
        "train.early_stopping",
        "train.threads",
        "train.checkpoint_every",
        "model.checkpoint_every",
        "optim.weight_decay",
        "optim.grad_clip",
        "optim.patience",
        "optim.min_lr",
        "optim.warmup_steps",
        "optim.momentum",
        "optim.decay_start",
    ]
    for key in positive:
        if OmegaConf.select(config, key) <= 0:
            raise ConfigError(
                f"config key '{key}' must be > 0, got {OmegaConf.select(config, key)}"
            )
    for key in non_negative:
        if OmegaConf.select(config, key) < 0:
            raise ConfigError(
                f"config key '{key}' must be >= 0, got {OmegaConf.select(config, key)}"
            )
    _check_finite(to_container(config))
    ranges = {
        "optim.lr": (0.0 < config.optim.lr <= MAX_RATE, f"in (0, {MAX_RATE:g}]"),
        "optim.weight_decay": (config.optim.weight_decay <= MAX_RATE, f"at most {MAX_RATE:g}"),
        "optim.momentum": (config.optim.momentum < 1, "in [0, 1)"),
        "optim.decay": (0 < config.optim.decay <= 1, "in (0, 1]"),
        "model.dropout": (0 <= config.model.dropout < 1, "in [0, 1)"),
        "model.depth": (config.model.depth <= MAX_DEPTH, f"at most {MAX_DEPTH}"),
        "train.seed": (0 <= config.train.seed <= MAX_SEED, f"in [0, {MAX_SEED}] (2**63 - 1)"),
    }
    for key, (ok, expected) in ranges.items():
        if not ok:
            raise ConfigError(
                f"config key '{key}' must be {expected}, got {OmegaConf.select(config, key)}"
            )
    _check_rates(config.model)
    _check_layer_norm(config.model)
    check_device(config.train.device, "config key 'train.device'")
    memory = config.model.memory
    if memory is not None and not isinstance(memory, (str, DictConfig)):
        raise ConfigError(
            "config key 'model.memory' must be a registered name or a mapping with a 'name' key, "
            f"got {memory!r}"
        )
    if isinstance(memory, DictConfig) and not isinstance(memory.get("name"), str):
        raise ConfigError(
            "config key 'model.memory' needs a 'name' key (e.g. {name: nested, depth: 3})"
        )


def _check_rates(model: DictConfig) -> None:
    """The regularisers' rates: probabilities in [0, 1); per-level ones a rate or a list with one
    per memory level of an nlstm model."""
    singles = ["input_dropout", "output_dropout", "zoneout_hidden"]
    for key in singles:
        value = model[key]
        if value is not None and not _is_rate(value):
            raise ConfigError(f"config key 'model.{key}' must be in [0, 1), got {value!r}")
    for key in ("weight_drop", "zoneout_cell"):
        value = model[key]
        values = list(value) if isinstance(value, ListConfig) else [value]
        if not values or not all(_is_rate(v) for v in values):
            raise ConfigError(
                f"config key 'model.{key}' must be a rate in [0, 1) or a list of one rate per "
                f"memory level, got {_plain_value(value)!r}"
            )
        per_level = model.family == "nlstm" and model.memory is None
        if len(values) > 1 and per_level and len(values) != model.depth:
            raise ConfigError(
                f"config key 'model.{key}' has {len(values)} rates for model.depth="
                f"{model.depth} memory levels; give one per level or a single rate"
            )


def _check_layer_norm(model: DictConfig) -> None:
    """``model.layer_norm``: a bool, or a list of one bool per memory level of an nlstm model."""
    value = model.layer_norm
    values = list(value) if isinstance(value, ListConfig) else [value]
    if not values or not all(isinstance(v, bool) for v in values):
        raise ConfigError(
            "config key 'model.layer_norm' must be true, false or a list of one of them per "
            f"memory level, got {_plain_value(value)!r}"
        )
    per_level = model.family == "nlstm" and model.memory is None
    if isinstance(value, ListConfig) and per_level and len(values) != model.depth:
        raise ConfigError(
            f"config key 'model.layer_norm' has {len(values)} values for model.depth="
            f"{model.depth} memory levels; give one per level or a single bool"
        )


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def _plain_value(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every number in the configuration is finite (inf and nan mean nothing in any setting)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_finite(value, f"{prefix}{index}.")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config key '{prefix[:-1]}' must be a finite number, got {node}")


def check_device(spec: str, what: str = "the device") -> None:
    """Raise ConfigError unless ``spec`` names a device: auto, cpu, cuda, cuda:N or mps."""
    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", spec):
        raise ConfigError(f"{what} must be auto, cpu, cuda, cuda:N or mps; got {spec!r}")


def model_changes(saved: DictConfig, config: DictConfig) -> list[str]:
    """The ``model.*`` settings of ``config`` that differ from the ``saved`` run's, as
    ``"model.key: old -> new"`` (the keys in :data:`MODEL_KEYS_FREE_AFTER_TRAINING` may differ)."""
    old, new = to_container(saved.model), to_container(config.model)
    return [
        f"model.{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in MODEL_KEYS_FREE_AFTER_TRAINING and old.get(key) != new.get(key)
    ]


def trained_config(saved: str | Mapping[str, Any]) -> DictConfig:
    """The configuration a checkpoint holds (its YAML text or a mapping), resolved as
    :func:`load_config` resolves a saved run's: settings added since it was written take their
    defaults, so comparing it with a configuration of today reports only real changes."""
    return load_config([], [], base=OmegaConf.to_container(OmegaConf.create(cast(Any, saved))))


def check_same_model(
    trained: DictConfig,
    config: DictConfig,
    changed: Callable[[str], str],
    task_changed: Callable[[str, str], str] | None = None,
) -> None:
    """Raise ConfigError when ``config`` changes the task or the model (see
    :func:`model_changes`) of the run ``trained`` was the configuration of (see
    :func:`trained_config`).

    The message is ``changed("model.key: old -> new; ...")``; a changed task is the message
    ``task_changed(old, new)``, or, without it, listed first (``task.name: 'old' -> 'new'``)."""
    changes = model_changes(trained, config)
    old, new = trained.task.name, config.task.name
    if old != new:
        if task_changed is not None:
            raise ConfigError(task_changed(old, new))
        changes.insert(0, f"task.name: {old!r} -> {new!r}")
    if changes:
        raise ConfigError(changed("; ".join(changes)))


# --------------------------------------------------------------------------- conversion & printing


def to_container(config: DictConfig) -> dict[str, Any]:
    """A plain, picklable dict (what checkpoints and config.yaml hold)."""
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]


def section(config: DictConfig, name: str) -> Any:
    """One section as its dataclass instance (``section(cfg, "model") -> ModelConfig``)."""
    return OmegaConf.to_object(config[name])


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a dataclass's source (nanoGPT style)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s?([^\n]*)$", source, re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _yaml_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    text = OmegaConf.to_yaml({"v": value}).strip()
    return text[len("v: ") :] if text.startswith("v: ") else text[len("v:") :].strip()


def format_config(config: DictConfig) -> str:
    """The resolved configuration as YAML with each field's comment; loadable with ``-c``."""
    container = to_container(config)
    options_cls = type(OmegaConf.to_object(config.task))
    classes = {"task": options_cls, **SECTIONS}
    lines: list[str] = []
    for name, cls in classes.items():
        comments = field_comments(cls)
        values = container[name]
        rendered = [
            (f"  {key}: {_yaml_value(value)}", comments.get(key, ""))
            for key, value in values.items()
        ]
        width = max((len(text) for text, _ in rendered), default=0)
        lines.append(f"{name}:")
        for text, comment in rendered:
            lines.append(f"{text.ljust(width)}  # {comment}" if comment else text)
    return "\n".join(lines) + "\n"
