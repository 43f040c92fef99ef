"""Shared machinery of the character-level language-model tasks.

A :class:`CharLMTask` turns a corpus (three token streams: train, valid, test) into the standard
truncated-BPTT setup: each split is cut into ``batch_size`` contiguous streams read in chunks of
``train.bptt`` steps, with the recurrent state carried from chunk to chunk (see
:class:`nestrnn.engine.batching.StreamBatches`). The model is an embedding, the recurrent core and a
linear read-out; the loss is the mean negative log-likelihood per token, reported as ``loss`` (nats),
``bpc`` (bits per character: loss / ln 2) and ``ppl`` (perplexity: exp(loss)).

Subclasses implement :meth:`CharLMTask.load_splits`, returning each split as a list of symbols
(strings) or, for large corpora, as ids already encoded with ``self.vocab``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from nestrnn.tasks.base import Batch, Task, fingerprint
from torch import Tensor, nn

from nestrnn.config import ModelConfig
from nestrnn.engine.batching import StreamBatches, compact_ids
from nestrnn.errors import UserError
from nestrnn.models import TokenModel

SPLITS = ("train", "valid", "test")
LN2 = math.log(2.0)


class UnknownSymbols(UserError, ValueError):
    """Text to encode holds symbols that the vocabulary lacks (``unk`` or not: a prime or text
    given to a trained model is the user's own, and silently reading part of it as ``unk`` would
    condition the model on something else)."""


class Vocab:
    """Symbols (strings) and their ids; ``unk`` (when given) stands for unseen symbols."""

    def __init__(self, symbols: Sequence[str], unk: str | None = None) -> None:
        symbols = list(symbols)
        if unk is not None and unk not in symbols:
            symbols.append(unk)
        if len(set(symbols)) != len(symbols):
            raise ValueError("vocabulary symbols must be unique")
        self.symbols = symbols
        self.unk = unk
        self.index = {s: i for i, s in enumerate(symbols)}

    @classmethod
    def build(cls, tokens: Iterable[str], unk: str | None = None) -> Vocab:
        """Sorted distinct symbols of ``tokens`` (deterministic)."""
        return cls(sorted(set(tokens) - ({unk} if unk else set())), unk)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, tokens: Sequence[str]) -> tuple[Tensor, int]:
        """Token ids and how many tokens were unknown (mapped to ``unk``).

        Raises KeyError naming the first unknown symbol when there is no ``unk``.
        """
        if self.unk is None:
            try:
                ids = [self.index[t] for t in tokens]
            except KeyError as error:
                raise KeyError(f"symbol {error.args[0]!r} is not in the vocabulary") from None
            return torch.tensor(ids, dtype=torch.long), 0
        unk = self.index[self.unk]
        ids = [self.index.get(t, unk) for t in tokens]
        unknown = sum(1 for t in tokens if t not in self.index)
        return torch.tensor(ids, dtype=torch.long), unknown

    def state_dict(self) -> dict[str, Any]:
        return {"symbols": list(self.symbols), "unk": self.unk}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Vocab:
        return cls(state["symbols"], state.get("unk"))


class CharLMTask(Task):
    """Base class of character-level language-model tasks (see the module docstring)."""

    kind: ClassVar[str] = "lm"
    primary_metric: ClassVar[str] = "bpc"
    carries_state: ClassVar[bool] = True
    config_defaults: ClassVar[dict[str, Any]] = {
        "model": {"hidden_size": 256},
        "optim": {"lr": 0.002, "schedule": "plateau", "patience": 0},
        "train": {
            "epochs": 20,
            "steps_per_epoch": 0,
            "batch_size": 32,
            "bptt": 100,
            "eval_batch_size": 16,
            "log_every": 50,
            "early_stopping": 5,
        },
    }
    #: how symbols are shown by `decode` (e.g. PTB's "_" is a space)
    display: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.vocab: Vocab | None = None
        self.splits: dict[str, Tensor] = {}
        self.unknown: dict[str, int] = {}
        self._streams: dict[tuple[str, int, int], StreamBatches] = {}

    # -- data

    def load_splits(self) -> dict[str, Sequence[str] | Tensor]:
        """Each split as symbols, or as ids encoded with ``self.vocab`` (set it first)."""
        raise NotImplementedError

    def build_vocab(self, train: Sequence[str]) -> Vocab:
        """The vocabulary, from the training symbols (override to add ``unk``)."""
        return Vocab.build(train)

    def known_vocab_size(self) -> int | None:
        """The vocabulary's size when it is known without the data (for the published data set
        and these options); None: only the data says."""
        return None

    def prepare_sizes(self) -> None:
        """The vocabulary's size: :meth:`known_vocab_size`, else the local data (never a
        download)."""
        if self.vocab is not None:
            return
        size = self.known_vocab_size()
        if size is not None:
            self.vocab = Vocab([f"<{i}>" for i in range(size)])  # stands in for the symbols
            return
        if getattr(self.options, "download", False):
            self.options = dataclasses.replace(self.options, download=False)
        self.prepare()

    def prepare(self) -> None:
        loaded = self.load_splits()
        if self.vocab is None:
            train = loaded["train"]
            if isinstance(train, Tensor):
                raise RuntimeError("load_splits returned ids but set no vocabulary")
            self.vocab = self.build_vocab(train)
        for split in SPLITS:
            data = loaded[split]
            if isinstance(data, Tensor):
                ids, unknown = data, 0
            else:
                try:
                    ids, unknown = self.vocab.encode(data)
                except KeyError as error:
                    raise ValueError(
                        f"the {split} split has a {error.args[0]} (and the task has no <unk>); "
                        "was the checkpoint made from other data?"
                    ) from None
            self.splits[split] = compact_ids(ids, len(self.vocab))
            self.unknown[split] = unknown

    def state_dict(self) -> dict[str, Any]:
        return {"vocab": self.vocab.state_dict()} if self.vocab is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "vocab" in state:
            self.vocab = Vocab.from_state(state["vocab"])

    def data_fingerprint(self) -> str | None:
        """The token ids of every split and the vocabulary (the seed shapes no LM data)."""
        return fingerprint(self.vocab.symbols, *(self.splits[split] for split in SPLITS))

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {self.splits[s].numel():,}" for s in SPLITS if s in self.splits)
        unknown = ", ".join(f"{s} {n:,}" for s, n in self.unknown.items() if n)
        text = f"{len(self.vocab)} symbols; tokens: {sizes}"
        return text + (
            f"; unknown symbols mapped to {self.vocab.unk}: {unknown}" if unknown else ""
        )

    # -- model, batches, loss

    def build_model(self, model_cfg: ModelConfig, hidden_size: int) -> nn.Module:
        if self.vocab is None:
            raise RuntimeError("prepare() (or load_state_dict) must run before build_model()")
        return TokenModel(model_cfg, len(self.vocab), len(self.vocab), hidden_size)

    def streams(self, split: str, batch_size: int, bptt: int) -> StreamBatches:
        key = (split, batch_size, bptt)
        if key not in self._streams:
            self._streams[key] = StreamBatches(self.splits[split], batch_size, bptt, split)
        return self._streams[key]

    def num_train_batches(self, batch_size: int, bptt: int) -> int:
        streams = self.streams("train", batch_size, bptt)
        if streams.num_full == 0:
            raise ValueError(
                f"the training split is too short for batch_size={batch_size} x bptt={bptt}"
            )
        return streams.num_full

    def train_batch(self, index: int, batch_size: int, bptt: int) -> Batch:
        streams = self.streams("train", batch_size, bptt)
        i = index % streams.num_full
        x, y = streams.chunk(i)
        return Batch(x, y, carry=i != 0)

    def eval_batches(self, split: str, batch_size: int, bptt: int) -> Iterator[Batch]:
        for i, (x, y) in enumerate(self.streams(split, batch_size, bptt)):
            yield Batch(x, y, carry=i != 0)

    def loss(self, output: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        nll = F.cross_entropy(
            output.reshape(-1, output.shape[-1]).float(), batch.targets.reshape(-1), reduction="sum"
        )
        count = batch.targets.numel()
        return nll / count, {"nll": nll.detach(), "count": torch.tensor(float(count))}

    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        loss = stats["nll"] / max(stats["count"], 1.0)
        return {"loss": loss, "bpc": loss / LN2, "ppl": math.exp(min(loss, 50.0))}

    # -- text in and out (nestrnn sample)

    def text_to_symbols(self, text: str) -> list[str]:
        """Symbols of a prime text; the default: one symbol per character."""
        inverse = {v: k for k, v in self.display.items()}
        return [inverse.get(ch, ch) for ch in text]

    def encode(self, text: str) -> list[int]:
        """The ids of a user's text (``nestrnn sample --prime``, ``nestrnn viz --text``); symbols
        the vocabulary lacks are an :class:`UnknownSymbols` error naming them, with or without an
        ``unk`` symbol."""
        symbols = self.text_to_symbols(text)
        missing = sorted({s for s in symbols if s not in self.vocab.index})
        if missing:
            shown = ", ".join(repr(s) for s in missing[:10])
            raise UnknownSymbols(f"the text has symbols the model does not know: {shown}")
        return self.vocab.encode(symbols)[0].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.display.get(self.vocab.symbols[i], self.vocab.symbols[i]) for i in ids)


def split_contiguous(ids: np.ndarray | Sequence[Any], valid: float, test: float) -> dict[str, Any]:
    """Cut one corpus into train / valid / test, in that order, by fractions."""
    n = len(ids)
    n_test = round(n * test)
    n_valid = round(n * valid)
    n_train = n - n_valid - n_test
    if n_train <= 0 or (valid > 0 and n_valid == 0) or (test > 0 and n_test == 0):
        raise ValueError(f"a corpus of {n:,} symbols is too small for this split")
    return {
        "train": ids[:n_train],
        "valid": ids[n_train : n_train + n_valid],
        "test": ids[n_train + n_valid :],
    }
