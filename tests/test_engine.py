"""The training engine: exact resume, checkpoints, divergence, TBPTT state, batching, schedules,
model families and parameter sizing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_tasks import BACKEND, TINY, write_text
from omegaconf import OmegaConf

from nestrnn.config import ConfigError, ModelConfig, OptimConfig, load_config
from nestrnn.engine import rundir as rd
from nestrnn.engine.batching import ShuffledBatches, StreamBatches, generator
from nestrnn.engine.schedule import LRSchedule
from nestrnn.engine.trainer import Trainer, TrainingDiverged, resolve_device
from nestrnn.models import (
    SequenceModel,
    TokenModel,
    count_parameters,
    family_table,
    format_family_table,
    size_model,
    solve_hidden_size,
)


def text_config(tmp_path: Path, *extra: str):
    corpus = write_text(tmp_path / "corpus.txt", repeats=12)
    return load_config(
        [],
        [
            *TINY,
            "task.name=text_file",
            f"task.path={corpus}",
            "train.epochs=2",
            "train.steps_per_epoch=5",
            "train.batch_size=4",
            "train.bptt=6",
            "train.eval_batch_size=4",
            "model.dropout=0.1",
            *extra,
        ],
    )


def copy_config(*extra: str):
    return load_config(
        [],
        [
            *TINY,
            "task.name=copy_memory",
            "task.length=3",
            "task.delay=4",
            "task.valid_size=16",
            "task.test_size=16",
            "train.epochs=2",
            "train.steps_per_epoch=4",
            "train.batch_size=8",
            "model.dropout=0.2",
            *extra,
        ],
    )


def _records(run_dir: Path) -> list[dict]:
    return [r for r in rd.RunDir(run_dir).records() if r["event"] in ("train", "epoch", "test")]


@pytest.mark.parametrize("kind", ["lm", "classify"])
def test_resume_continues_exactly(tmp_path: Path, kind: str) -> None:
    config = text_config(tmp_path) if kind == "lm" else copy_config()
    Trainer(config, tmp_path / "whole", echo=None).fit()

    first = Trainer(config, tmp_path / "split", echo=None)
    summary = first.fit(stop_at=3)  # in the middle of the first epoch
    assert summary.reason == "stopped" and summary.steps == 3
    if kind == "lm":
        assert first.carry is not None  # the carried TBPTT state goes into the checkpoint
    del first
    torch.manual_seed(1234)  # whatever happens in between must not matter
    Trainer(config, tmp_path / "split", resume=True, echo=None).fit()

    whole, split = _records(tmp_path / "whole"), _records(tmp_path / "split")
    steps = config.train.epochs * config.train.steps_per_epoch
    assert [r["event"] for r in whole].count("train") == steps
    assert split == whole


def test_fit_again_continues_where_fit_stopped(tmp_path: Path) -> None:
    config = copy_config()
    Trainer(config, tmp_path / "whole", echo=None).fit()
    trainer = Trainer(config, tmp_path / "split", echo=None)
    assert trainer.fit(stop_at=3).reason == "stopped"
    assert trainer.fit().reason == "completed"
    assert trainer.fit().reason == "already_finished"
    assert _records(tmp_path / "split") == _records(tmp_path / "whole")


def test_resume_across_an_epoch_boundary_and_more_epochs(tmp_path: Path) -> None:
    config = text_config(tmp_path, "train.epochs=3")
    Trainer(config, tmp_path / "whole", echo=None).fit()
    short = text_config(tmp_path)  # 2 epochs, then continue to 3
    Trainer(short, tmp_path / "split", echo=None).fit()
    Trainer(config, tmp_path / "split", resume=True, echo=None).fit()
    whole = [r for r in _records(tmp_path / "whole") if r["event"] != "test"]
    split = [r for r in _records(tmp_path / "split") if r["event"] != "test"]
    assert split == whole


def test_checkpoint_is_weights_only_and_complete(tmp_path: Path) -> None:
    trainer = Trainer(text_config(tmp_path), tmp_path / "run", echo=None)
    trainer.fit()
    for name in (rd.LAST, rd.BEST):
        payload = torch.load(tmp_path / "run" / name, weights_only=True)
        assert payload["format"] == rd.FORMAT
        assert isinstance(payload["config"], str) and "text_file" in payload["config"]
        assert payload["task"]["vocab"]["symbols"]
    last = torch.load(tmp_path / "run" / rd.LAST, weights_only=True)
    assert {"optimizer", "schedule", "rng", "position", "carry", "progress"} <= set(last)
    assert set(last["rng"]) >= {"torch", "python", "numpy"}
    assert last["position"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 10}
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "config.yaml",
        "environment.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "summary.json",
    } <= files
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "config.yaml"))
    assert load_config([], [], base=saved).task.name == "text_file"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reason"] == "completed" and "bpc" in summary["test"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(copy_config("train.checkpoint_every=2"), tmp_path / "run", echo=None)
    loss = trainer.task.loss
    calls = {"n": 0}

    def poisoned(output, batch):
        value, stats = loss(output, batch)
        calls["n"] += 1
        return (value * math.nan if calls["n"] == 4 else value), stats

    trainer.task.loss = poisoned
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "loss became nan at step 4 (epoch 1)" in message
    assert "last good checkpoint" in message and "(step 2)" in message
    checkpoint = rd.load_checkpoint(tmp_path / "run" / rd.LAST)
    assert checkpoint["position"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert not all(torch.equal(good[k], v) for k, v in checkpoint["model"].items())
    assert rd.RunDir(tmp_path / "run").records()[-1]["event"] == "diverged"


def test_tbptt_carries_the_full_nested_state(tmp_path: Path) -> None:
    """Evaluating in chunks of 3 steps equals evaluating in one chunk: the whole nested state
    (h and every memory level's cell) crosses chunk boundaries."""
    config = text_config(tmp_path, "model.depth=3", "model.dropout=0.0")
    trainer = Trainer(config, tmp_path / "run", echo=None)
    streams = trainer.task.streams("valid", 4, 3)
    whole = trainer.task.streams("valid", 4, streams.length)
    assert whole.num_chunks == 1 and streams.num_chunks > 3
    chunked = trainer.evaluate("valid")  # bptt 6
    trainer.train_cfg.bptt = streams.length
    unchunked = trainer.evaluate("valid")
    trainer.train_cfg.bptt = 3
    small = trainer.evaluate("valid")
    assert chunked["loss"] == pytest.approx(unchunked["loss"], rel=1e-5)
    assert small["loss"] == pytest.approx(unchunked["loss"], rel=1e-5)
    state = trainer.model(whole.chunk(0)[0], None)[1]
    assert state[1].shape[0] == 3  # c_n holds the three memory levels


def test_early_stopping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = copy_config("train.epochs=10", "train.early_stopping=2", "train.steps_per_epoch=1")
    trainer = Trainer(config, tmp_path / "run", echo=None)
    monkeypatch.setattr(
        trainer,
        "evaluate",
        lambda split="valid", max_batches=None: {"loss": 1.0, "error": 50.0, "baseline": 0.5},
    )
    summary = trainer.fit()
    assert summary.reason == "early_stopping" and summary.epochs == 3


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    Trainer(copy_config("train.max_steps=2"), tmp_path / "run", echo=None).fit()
    with pytest.raises(ConfigError, match=r"model.hidden_size: 8 -> 12"):
        Trainer(copy_config("model.hidden_size=12"), tmp_path / "run", resume=True, echo=None)
    with pytest.raises(ConfigError, match="cannot resume a copy_memory run as task adding"):
        config = load_config([], [*TINY, "task.name=adding"])
        Trainer(config, tmp_path / "run", resume=True, echo=None)


def test_resume_fills_in_model_settings_the_checkpoint_predates(tmp_path: Path) -> None:
    """A checkpoint written before a model setting existed resumes: the setting takes its
    default, as in ``eval``, and is no change of the model."""
    Trainer(copy_config("train.max_steps=2"), tmp_path / "run", echo=None).fit()
    run = rd.RunDir(tmp_path / "run")
    payload = run.load_checkpoint()
    saved = OmegaConf.create(payload["config"])
    del saved.model["recurrent_init"]
    payload["config"] = OmegaConf.to_yaml(saved)
    run.save_checkpoint(rd.LAST, payload)
    assert Trainer(copy_config(), tmp_path / "run", resume=True, echo=None).fit().steps == 8
    with pytest.raises(ConfigError, match=r"model.recurrent_init: 'orthogonal' -> 'uniform'"):
        config = copy_config("model.recurrent_init=uniform")
        Trainer(config, tmp_path / "run", resume=True, echo=None)


def test_max_steps_then_resume(tmp_path: Path) -> None:
    config = copy_config("train.max_steps=5")
    summary = Trainer(config, tmp_path / "run", echo=None).fit()
    assert summary.reason == "max_steps" and summary.steps == 5
    resumed = Trainer(copy_config(), tmp_path / "run", resume=True, echo=None).fit()
    assert resumed.steps == 8 and resumed.reason == "completed"


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="^--device=cuda:1 but CUDA is not available"):
            resolve_device("cuda:1", "--device")
    with pytest.raises(
        ConfigError, match="^--device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"
    ):
        resolve_device("tpu", "--device")


def test_a_gpu_this_machine_lacks_is_named(monkeypatch) -> None:
    """cuda:N past the last GPU is a one-line error saying which ones there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ConfigError,
        match=r"^train.device=cuda:7 but this machine has 2 CUDA "
        r"device\(s\), cuda:0 to cuda:1; use one of them, cuda or auto$",
    ):
        resolve_device("cuda:7")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda(tmp_path: Path) -> None:
    summary = Trainer(copy_config("train.device=cuda"), tmp_path / "run", echo=None).fit()
    assert summary.test


# --------------------------------------------------------------------------- batching


def test_stream_batches_layout() -> None:
    ids = torch.arange(50)
    streams = StreamBatches(ids, batch_size=4, bptt=5)
    assert streams.length == 12 and streams.num_full == 2 and streams.num_chunks == 3
    x, y = streams.chunk(0)
    assert x[1].tolist() == [12, 13, 14, 15, 16] and y[1].tolist() == [13, 14, 15, 16, 17]
    last_x, last_y = streams.chunk(2)
    assert last_x.shape == (4, 1) and last_y[:, -1].tolist() == [11, 23, 35, 47]
    predicted = torch.cat([y for _, y in streams], dim=1)
    assert predicted.numel() == 4 * 11  # every token but each stream's first, once


def test_shuffled_batches_are_a_function_of_the_index() -> None:
    batches = ShuffledBatches(10, 3, seed=5)
    assert batches.num_batches == 3
    first_pass = torch.cat([batches.indices(i) for i in range(3)])
    assert len(set(first_pass.tolist())) == 9
    assert torch.equal(ShuffledBatches(10, 3, seed=5).indices(4), batches.indices(4))
    assert not torch.equal(batches.indices(3), batches.indices(0))
    a = torch.rand(3, generator=generator(1, 2))
    assert torch.equal(a, torch.rand(3, generator=generator(1, 2)))


# --------------------------------------------------------------------------- schedules


def _schedule(**options) -> LRSchedule:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRSchedule(optimizer, OptimConfig(lr=1.0, **options), total_steps=100)


def test_schedules() -> None:
    plateau = _schedule(schedule="plateau", decay=0.5, patience=1)
    for epoch, metric in enumerate([3.0, 2.0, 2.5, 2.5, 1.0], 1):
        plateau.epoch_end(epoch, metric)
    assert plateau.step(0) == 0.5  # decayed once after two epochs without improvement
    step = _schedule(schedule="step", decay=0.5, decay_start=2)
    for epoch in range(1, 5):
        step.epoch_end(epoch, None)
    assert step.step(0) == 0.125
    cosine = _schedule(schedule="cosine", min_lr=0.1)
    assert cosine.step(0) == 1.0 and cosine.step(50) == pytest.approx(0.55)
    assert cosine.step(100) == pytest.approx(0.1)
    warm = _schedule(warmup_steps=4)
    assert [warm.step(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    restored = _schedule(schedule="plateau")
    restored.load_state_dict(plateau.state_dict())
    assert restored.state_dict() == plateau.state_dict()


# --------------------------------------------------------------------------- models & sizing


@pytest.mark.parametrize("family", ["nlstm", "lstm", "stacked_lstm"])
@pytest.mark.parametrize("impl", ["torch", "nestrnn"])
def test_families_build_and_run(family: str, impl: str) -> None:
    cfg = ModelConfig(family=family, lstm_impl=impl, num_layers=2, dropout=0.1, backend=BACKEND)
    model = TokenModel(cfg, 7, 5, 6)
    out, state = model(torch.randint(0, 7, (3, 4)))
    assert out.shape == (3, 4, 5)
    out2, _ = model(torch.randint(0, 7, (3, 2)), state)  # state goes back in at any depth
    assert out2.shape == (3, 2, 5)
    seq = SequenceModel(cfg, 4, 10, 6)
    assert seq(torch.randn(3, 5, 4))[0].shape == (3, 10)


def test_nested_and_stacked_have_equal_parameters_at_equal_size() -> None:
    nlstm = TokenModel(ModelConfig(family="nlstm", depth=2, backend=BACKEND), 10, 10, 32)
    stacked = TokenModel(ModelConfig(family="stacked_lstm", depth=2), 10, 10, 32)
    assert count_parameters(nlstm) == count_parameters(stacked)
    memory = ModelConfig(family="nlstm", memory={"name": "nested", "depth": 3}, backend=BACKEND)
    assert TokenModel(memory, 10, 10, 8).rnn.depth == 3


def test_sizing_to_a_parameter_target() -> None:
    def build(cfg: ModelConfig, hidden: int) -> TokenModel:
        return TokenModel(cfg, 50, 50, hidden)

    rows = family_table(ModelConfig(target_params=200_000, backend=BACKEND), build)
    assert [r.family for r in rows] == ["nlstm", "lstm", "stacked_lstm"]
    for row in rows:
        assert abs(row.params - 200_000) / 200_000 < 0.02
        assert (
            count_parameters(build(ModelConfig(family=row.family), row.hidden_size)) == row.params
        )
    assert rows[1].hidden_size > rows[0].hidden_size  # a single LSTM is wider for the same budget
    table = format_family_table(rows, "lstm")
    assert "<- this run" in table and "200,000" not in table
    with pytest.raises(ValueError, match="the smallest nlstm model .* shrink model.embedding_dim"):
        size_model(ModelConfig(target_params=100, embedding_dim=64, backend=BACKEND), build)
    fixed = size_model(ModelConfig(hidden_size=16), build)
    assert fixed.hidden_size == 16 and fixed.target == 0
    hidden, params = solve_hidden_size(lambda h: torch.nn.Linear(h, h), 10_000)
    assert hidden == 99 and params == 99 * 100
