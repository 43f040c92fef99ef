"""Configuration: schemas, YAML files, overrides and one-line errors with suggestions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers_tasks import REPO
from omegaconf import OmegaConf

from nestrnn.config import (
    DEFAULT_TASK,
    SECTIONS,
    ConfigError,
    field_comments,
    format_config,
    load_config,
    to_container,
)
from nestrnn.registry import get_task, task_names

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_describe_the_default_run() -> None:
    config = load_config()
    assert config.task.name == DEFAULT_TASK
    assert config.model.family == "nlstm"
    assert config.model.backend == "auto"


def test_default_yaml_matches_the_built_in_defaults() -> None:
    assert to_container(load_config([REPO / "configs" / "default.yaml"])) == to_container(
        load_config()
    )
    assert to_container(load_config(["default"])) == to_container(load_config())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_bundled_config_loads(path: Path) -> None:
    config = load_config([path])
    assert config.task.name in task_names()


def test_paper_configs_compare_families_at_equal_parameters() -> None:
    for name in ("ptb_char", "text8", "chinese_poems", "mnist_glimpses"):
        config = load_config([REPO / "configs" / f"{name}.yaml"])
        assert config.task.name == name
        assert config.model.target_params > 0
        for family in ("nlstm", "lstm", "stacked_lstm"):
            load_config([REPO / "configs" / f"{name}.yaml"], [f"model.family={family}"])


def test_overrides_win_and_are_typed() -> None:
    config = load_config([], ["train.epochs=3", "optim.lr=1e-3", "model.forget_bias=null"])
    assert config.train.epochs == 3
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.model.forget_bias is None


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 5\nmodel:\n  family: lstm\n")
    config = load_config([path], ["train.batch_size=9"])
    assert (config.train.epochs, config.train.batch_size, config.model.family) == (7, 9, "lstm")


def test_task_options_follow_the_task() -> None:
    config = load_config(
        [], ["task.name=mnist_glimpses", "task.glimpse_size=4", "task.order=snake"]
    )
    assert config.task.glimpse_size == 4
    assert config.task.order == "snake"
    # a task's own defaults for the other sections apply before the user's values
    assert config.train.steps_per_epoch == 0


def test_memory_option_takes_a_mapping() -> None:
    config = load_config([], ["model.memory={name: nested, depth: 3}"])
    assert OmegaConf.to_container(config.model.memory) == {"name": "nested", "depth": 3}


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_a_close_match() -> None:
    message = _error([], ["optim.lrr=0.1"])
    assert "unknown config key 'optim.lrr'" in message
    assert "did you mean 'optim.lr'" in message
    assert "command line" in message


def test_unknown_key_in_the_wrong_section_suggests_the_right_one() -> None:
    assert "did you mean 'optim.lr'" in _error([], ["train.lr=0.1"])
    assert "did you mean 'train.batch_size'" in _error([], ["train.batchsize=3"])


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 3\n")
    message = _error([path])
    assert str(path) in message and "did you mean 'model.hidden_size'" in message


def test_wrong_type_is_one_line() -> None:
    message = _error([], ["train.batch_size=abc"])
    assert message == (
        "config key 'train.batch_size' must be an integer, got 'abc' (in the command line)"
    )
    assert "must be true or false" in _error([], ["train.progress=maybe"])
    assert "must be a number" in _error([], ["optim.lr=fast"])


def test_invalid_choice_suggests() -> None:
    message = _error([], ["model.family=nlsm"])
    assert "did you mean 'nlstm'" in message
    assert "did you mean 'row'" in _error([], ["task.name=mnist_glimpses", "task.order=rows"])


def test_unknown_task_suggests() -> None:
    assert "did you mean 'ptb_char'" in _error([], ["task.name=ptb_chr"])


def test_option_of_another_task_is_unknown() -> None:
    assert "unknown config key 'task.glimpse_size'" in _error([], ["task.glimpse_size=4"])


def test_malformed_override_and_ranges() -> None:
    assert "key=value" in _error([], ["train.epochs"])
    assert "must be > 0" in _error([], ["train.batch_size=0"])
    assert "section" in _error([], ["model=3"])
    assert "not found" in _error(["no/such/file.yaml"])


def test_print_config_round_trips(tmp_path: Path) -> None:
    config = load_config([], ["task.name=adding", "model.memory={name: nested, depth: 3}"])
    text = format_config(config)
    assert "# " in text  # each field with its comment
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert to_container(load_config([path])) == to_container(config)


def test_every_field_has_a_comment() -> None:
    classes = list(SECTIONS.values()) + [get_task(n).factory.Options for n in task_names()]
    for cls in classes:
        comments = field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in comments]
        assert not missing, f"{cls.__name__} fields without a comment: {missing}"
