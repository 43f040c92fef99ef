"""Every task on small fixtures written by the tests (and on the real data when it is present)."""

from __future__ import annotations

import dataclasses
import gzip
import math
import re
import struct
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers_tasks import (
    BACKEND,
    TINY,
    assert_one_line_error,
    idx_bytes,
    main_cli,
    mnist_arrays,
    shared_data_dir,
    write_mnist,
    write_poems,
    write_ptb,
    write_text,
    write_text8_zip,
)
from nestrnn.tasks.base import Task

from nestrnn.config import ModelConfig
from nestrnn.data_utils import DataError
from nestrnn.registry import get_task, task_names

TINY_MODEL = ModelConfig(hidden_size=8, embedding_dim=4, backend=BACKEND)
BUILTIN = (
    "ptb_char",
    "text8",
    "chinese_poems",
    "mnist_glimpses",
    "text_file",
    "copy_memory",
    "adding",
)


def make(name: str, seed: int = 0, **options) -> Task:
    cls = get_task(name).factory
    return cls(cls.Options(**options), seed=seed)


def one_step(task: Task, batch_size: int = 4, bptt: int = 6) -> float:
    """Build a tiny model, run one batch forward and backward; returns the loss."""
    model = task.build_model(TINY_MODEL, 8)
    batch = task.train_batch(0, batch_size, bptt)
    output, _ = model(batch.inputs, None)
    loss, stats = task.loss(output, batch)
    loss.backward()
    metrics = task.metrics({k: float(v) for k, v in stats.items()})
    assert all(math.isfinite(v) for v in metrics.values())
    assert task.primary_metric in metrics
    return float(loss.detach())


def test_builtin_tasks_are_registered_with_descriptions() -> None:
    for name in BUILTIN:
        entry = get_task(name)
        assert name in task_names()
        assert entry.description
        assert issubclass(entry.factory, Task)
        assert entry.factory.Options().name == name


# --------------------------------------------------------------------------- ptb_char


def test_ptb_char(tmp_path: Path) -> None:
    write_ptb(tmp_path)
    task = make("ptb_char", data_dir=str(tmp_path), download=False)
    task.prepare()
    assert "\n" in task.vocab.symbols and "_" in task.vocab.symbols
    assert all(len(s) == 1 for s in task.vocab.symbols)
    first_line = (tmp_path / "ptb.char.train.txt").read_text().splitlines()[0].split()
    assert task.decode(task.splits["train"][: len(first_line) + 1].tolist()) == (
        "".join(first_line).replace("_", " ") + "\n"
    )
    assert task.encode("the cat") == task.vocab.encode(list("the_cat"))[0].tolist()
    streams = task.streams("train", 4, 6)
    b0, b1 = task.train_batch(0, 4, 6), task.train_batch(1, 4, 6)
    assert b0.inputs.shape == (4, 6) and not b0.carry and b1.carry
    assert torch.equal(b0.targets[:, :-1], b0.inputs[:, 1:])
    assert torch.equal(b1.inputs[:, 0], b0.targets[:, -1])  # streams continue across batches
    assert task.train_batch(streams.num_full, 4, 6).carry is False  # a new pass resets the state
    one_step(task)


def test_ptb_char_rejects_bad_files(tmp_path: Path) -> None:
    write_ptb(tmp_path)
    train = tmp_path / "ptb.char.train.txt"
    train.write_text(train.read_text()[:-5])  # cut inside the last line
    with pytest.warns(UserWarning, match=r"ptb\.char\.train\.txt may be truncated"):
        make("ptb_char", data_dir=str(tmp_path), download=False).prepare()
    train.write_text("the cat sat\non the mat\n")  # word level
    with pytest.raises(DataError, match="not in ptb.char format"):
        make("ptb_char", data_dir=str(tmp_path), download=False).prepare()
    train.unlink()
    with pytest.raises(DataError, match="tomsercu/lstm"):
        make("ptb_char", data_dir=str(tmp_path), download=False).prepare()


# --------------------------------------------------------------------------- text8


def test_text8(tmp_path: Path) -> None:
    write_text8_zip(tmp_path, 1200)
    task = make(
        "text8",
        data_dir=str(tmp_path),
        download=False,
        train_chars=1000,
        valid_chars=100,
        test_chars=100,
    )
    task.prepare()
    assert len(task.vocab) == 27
    assert [task.splits[s].numel() for s in ("train", "valid", "test")] == [1000, 100, 100]
    assert (
        task.decode(task.splits["train"][:9].tolist())
        == (__import__("helpers_tasks").text8_bytes(1200).decode()[:9])
    )
    one_step(task)


def test_text8_checks_length_and_content(tmp_path: Path) -> None:
    write_text8_zip(tmp_path, 1100)
    options = {
        "data_dir": str(tmp_path),
        "download": False,
        "train_chars": 1000,
        "valid_chars": 100,
        "test_chars": 100,
    }
    with pytest.raises(DataError, match="has 1,100 characters, but the split needs 1,200"):
        make("text8", **options).prepare()
    path = write_text8_zip(tmp_path, 1200)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated zip
    with pytest.raises(DataError, match="text8.zip"):
        make("text8", **options).prepare()
    path.unlink()
    (tmp_path / "text8").write_bytes(b"hello World" * 110)  # extracted, wrong alphabet
    with pytest.raises(DataError, match="not text8"):
        make("text8", **{**options, "train_chars": 1010}).prepare()


def test_text8_canonical_split_detects_truncation(tmp_path: Path) -> None:
    (tmp_path / "text8").write_bytes(b"abc " * 1000)
    with pytest.raises(DataError, match=r"4,000 characters, but the split needs 100,000,000"):
        make("text8", data_dir=str(tmp_path), download=False).prepare()


# --------------------------------------------------------------------------- chinese_poems


def test_chinese_poems(tmp_path: Path) -> None:
    write_poems(tmp_path)
    task = make("chinese_poems", data_dir=str(tmp_path))
    task.prepare()
    assert "<unk>" in task.vocab.symbols and "\t" in task.vocab.symbols
    loss = one_step(task)
    assert loss > 0
    model = task.build_model(TINY_MODEL, 8)
    batch = next(iter(task.eval_batches("valid", 2, 10)))
    out, _ = model(batch.inputs)
    metrics = task.metrics({k: float(v) for k, v in task.loss(out, batch)[1].items()})
    assert set(metrics) == {"loss", "bpc", "ppl", "ppl_char"}
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2))
    assert task.decode(task.encode("春眠/不觉")) == "春眠\n不觉"


def test_chinese_poems_variants_and_fallback(tmp_path: Path) -> None:
    write_poems(tmp_path, names="split")
    five = make("chinese_poems", data_dir=str(tmp_path), variant="5")
    five.prepare()
    with pytest.warns(UserWarning, match="qtrain5 and qtrain7 together"):
        both = make("chinese_poems", data_dir=str(tmp_path), variant="all")
        both.prepare()
    assert both.splits["train"].numel() > five.splits["train"].numel()


def test_chinese_poems_errors(tmp_path: Path) -> None:
    write_poems(tmp_path)
    lines = (tmp_path / "qvalid").read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0]  # a quatrain with three lines
    (tmp_path / "qvalid").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qvalid, line 4: not a quatrain"):
        make("chinese_poems", data_dir=str(tmp_path)).prepare()
    write_poems(tmp_path)
    text = (tmp_path / "qtest").read_text(encoding="utf-8")
    (tmp_path / "qtest").write_text(text[: len(text) // 2 + 3], encoding="utf-8")  # cut short
    with pytest.raises(DataError, match=r"qtest, line \d+: not a quatrain"):
        make("chinese_poems", data_dir=str(tmp_path)).prepare()
    with pytest.raises(DataError, match="homepages.inf.ed.ac.uk"):
        make("chinese_poems", data_dir=str(tmp_path / "empty")).prepare()


# --------------------------------------------------------------------------- mnist_glimpses


def test_mnist_glimpses(tmp_path: Path) -> None:
    write_mnist(tmp_path, train=120, test=40)
    task = make(
        "mnist_glimpses", data_dir=str(tmp_path), download=False, valid_size=20, normalize=False
    )
    task.prepare()
    assert [len(task.labels[s]) for s in ("train", "valid", "test")] == [100, 20, 40]
    batch = task.train_batch(0, 8, 1)
    assert batch.inputs.shape == (8, 16, 49) and batch.targets.shape == (8,)
    image = task.images["test"][:1]
    seq = task.glimpses(image)[0]
    # step 5 = glimpse row 1, column 1 in row-major order
    assert torch.allclose(seq[5], image[0, 7:14, 7:14].float().flatten() / 255)
    one_step(task)


def test_mnist_glimpse_orders_and_sizes(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    image = torch.arange(28 * 28).view(1, 28, 28).to(torch.uint8)
    column = make("mnist_glimpses", data_dir=str(tmp_path), order="column", normalize=False)
    assert torch.allclose(column.glimpses(image)[0, 1], image[0, 7:14, 0:7].float().flatten() / 255)
    snake = make("mnist_glimpses", data_dir=str(tmp_path), order="snake", normalize=False)
    assert torch.allclose(
        snake.glimpses(image)[0, 4], image[0, 7:14, 21:28].float().flatten() / 255
    )
    rnd = make("mnist_glimpses", data_dir=str(tmp_path), order="random")
    assert sorted(rnd.order.tolist()) == list(range(16))
    four = make("mnist_glimpses", data_dir=str(tmp_path), glimpse_size=4)
    assert four.glimpses(image).shape == (1, 49, 16)
    overlapping = make("mnist_glimpses", data_dir=str(tmp_path), glimpse_size=8, stride=4)
    assert overlapping.glimpses(image).shape == (1, 36, 64)
    with pytest.raises(ValueError, match="does not tile"):
        make("mnist_glimpses", glimpse_size=5)
    task = make("mnist_glimpses", data_dir=str(tmp_path), download=False)
    task.prepare()  # uncompressed IDX files work too
    assert len(task.labels["test"]) == 40


def test_mnist_partial_training_set_warns(tmp_path: Path) -> None:
    write_mnist(tmp_path, train=60, test=20, train_prefix="train-first10k")
    assert (tmp_path / "train-images-first10k-idx3-ubyte.gz").exists()
    task = make("mnist_glimpses", data_dir=str(tmp_path), download=False)
    with pytest.warns(UserWarning, match="60 of the 60,000 MNIST training images"):
        task.prepare()
    assert len(task.labels["valid"]) == 5  # one twelfth by default


def test_mnist_detects_truncated_and_corrupt_files(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path)
    images, _ = mnist_arrays(120)
    paths["train_images"].write_bytes(gzip.compress(idx_bytes(images)[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is truncated"):
        make("mnist_glimpses", data_dir=str(tmp_path), download=False).prepare()
    data = gzip.compress(idx_bytes(images))
    paths["train_images"].write_bytes(data[: len(data) // 2])  # a cut gzip stream
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is corrupt or truncated"):
        make("mnist_glimpses", data_dir=str(tmp_path), download=False).prepare()
    paths["train_images"].write_bytes(gzip.compress(idx_bytes(images[:50])))
    with pytest.raises(DataError, match="50 images but"):
        make("mnist_glimpses", data_dir=str(tmp_path), download=False).prepare()
    paths["train_images"].unlink()
    with pytest.raises(DataError, match="ossci-datasets"):
        make("mnist_glimpses", data_dir=str(tmp_path), download=False).prepare()


def _gzip_bomb(header: bytes, zeros_mib: int) -> bytes:
    """A gzip file of ``header`` then ``zeros_mib`` MiB of zeros (gzip members one after the other,
    as gzip allows): about 1 KiB per MiB inflated."""
    member = gzip.compress(bytes(16 << 20), compresslevel=9)
    return gzip.compress(header) + member * (zeros_mib // 16)


def _peak_bytes_of(function) -> int:
    """The most memory Python allocated while ``function()`` ran (it may raise)."""
    tracemalloc.start()
    try:
        function()
    except Exception:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_mnist_gzip_bombs_are_not_inflated(tmp_path: Path) -> None:
    """A small .gz that inflates far beyond what its IDX header announces is refused after the
    header's bytes, without inflating the rest; a header announcing more than MNIST holds is
    refused before anything else is read."""
    paths = write_mnist(tmp_path)
    labels = paths["test_labels"]
    labels.write_bytes(_gzip_bomb(struct.pack(">II", 2049, 40), 256))  # 256 MiB inflated
    task = make("mnist_glimpses", data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz is too long: its header"):
        task.prepare()
    assert _peak_bytes_of(task.prepare) < 32 << 20
    labels.write_bytes(_gzip_bomb(struct.pack(">II", 2049, 1 << 30), 256))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte\.gz announces shape \(1073741824,\)"
    ):
        task.prepare()
    assert _peak_bytes_of(task.prepare) < 32 << 20


def test_text8_is_not_read_or_inflated_beyond_the_split(tmp_path: Path) -> None:
    options = {
        "data_dir": str(tmp_path),
        "download": False,
        "train_chars": 1000,
        "valid_chars": 100,
        "test_chars": 100,
    }
    # an extracted text8 of 1 TiB (sparse): refused by its size, not read
    with open(tmp_path / "text8", "wb") as handle:
        handle.truncate(1 << 40)
    with pytest.raises(
        DataError, match="has 1,099,511,627,776 characters, but the split needs 1,200"
    ):
        make("text8", **options).prepare()
    (tmp_path / "text8").unlink()
    # a zip whose member claims the split's 1,200 characters but inflates to 64 MiB
    path = tmp_path / "text8.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("text8", bytes(64 << 20))
    data = bytearray(path.read_bytes())
    claimed = struct.pack("<I", 64 << 20)
    for offset in (data.index(b"PK\x03\x04") + 22, data.index(b"PK\x01\x02") + 24):
        assert data[offset : offset + 4] == claimed
        data[offset : offset + 4] = struct.pack("<I", 1200)
    path.write_bytes(bytes(data))
    task = make("text8", **options)
    with pytest.raises(DataError, match=r"text8\.zip is corrupt"):
        task.prepare()
    assert _peak_bytes_of(task.prepare) < 32 << 20


# --------------------------------------------------------------------------- text_file


def test_text_file(tmp_path: Path) -> None:
    path = write_text(tmp_path / "corpus.txt")
    task = make("text_file", path=str(path), valid_fraction=0.1, test_fraction=0.1)
    task.prepare()
    total = sum(task.splits[s].numel() for s in ("train", "valid", "test"))
    assert total == len(path.read_text())
    assert task.decode(task.encode("To be")) == "To be"
    with pytest.raises(ValueError, match="does not know"):
        task.encode("Zebra!")
    one_step(task)


def test_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="task.path=FILE"):
        make("text_file").prepare()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait" * 10)
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8 \(byte 3"):
        make("text_file", path=str(bad)).prepare()
    with pytest.raises(ValueError, match="fraction"):
        make("text_file", path=str(bad), valid_fraction=0.6, test_fraction=0.5)


# --------------------------------------------------------------------------- synthetic


def test_copy_memory() -> None:
    task = make("copy_memory", symbols=4, length=3, delay=5, valid_size=10, test_size=10)
    task.prepare()
    batch = task.train_batch(7, 16, 0)
    assert batch.inputs.shape == (16, 12) and batch.targets.shape == (16, 12)
    x, y = batch.inputs, batch.targets
    assert torch.equal(y[:, -3:], x[:, :3])  # recall the symbols after the delimiter
    assert (y[:, :-3] == 0).all() and (x[:, 3:8] == 0).all() and (x[:, 8] == 5).all()
    assert torch.equal(task.train_batch(7, 16, 0).inputs, x)  # batch k is a function of k
    assert not torch.equal(task.train_batch(8, 16, 0).inputs, x)
    assert task.baseline() == pytest.approx(3 * math.log(4) / 12)
    one_step(task)


def test_adding() -> None:
    task = make("adding", length=10, valid_size=10, test_size=10)
    task.prepare()
    batch = task.train_batch(0, 16, 0)
    x, y = batch.inputs, batch.targets
    assert x.shape == (16, 10, 2)
    assert (x[..., 1].sum(1) == 2).all()
    assert (x[:, :5, 1].sum(1) == 1).all()  # one mark in each half
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)
    one_step(task)


@pytest.mark.parametrize(
    ("task", "option", "named"),
    [
        ("adding", "task.length=1000000000", "task.length"),
        ("adding", "task.valid_size=1000000000", "task.valid_size + task.test_size"),
        ("copy_memory", "task.delay=10000000000", "task.delay + 2 * task.length + 1"),
    ],
)
def test_a_generated_data_set_larger_than_memory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, option: str, named: str
) -> None:
    """One line naming the options and how far they may go, before anything is allocated."""
    run = tmp_path / "run"
    argv = ["train", f"task.name={task}", option, *TINY, "--run-dir", str(run)]
    code, _, err = main_cli(argv, capsys)
    assert_one_line_error(code, err, "train")
    assert code == 2 and "of RAM available" in err
    assert re.search(rf"lower {re.escape(named)} to at most [\d,]+", err), err
    assert not run.exists()


def test_task_models_work_on_the_meta_device(tmp_path: Path) -> None:
    task = make("copy_memory")
    with torch.device("meta"):
        model = task.build_model(TINY_MODEL, 16)
    assert next(model.parameters()).device.type == "meta"


# --------------------------------------------------------------------------- the real data


def _shared(sub: str) -> Path:
    root = shared_data_dir()
    if root is None or not (root / sub).is_dir():
        pytest.skip(f"real data {sub}/ not present (set NESTRNN_DATA_DIR)")
    return root / sub


def test_real_mnist_partial_set() -> None:
    folder = _shared("mnist")
    task = make("mnist_glimpses", data_dir=str(folder), download=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task.prepare()
    assert any("10,000 of the 60,000" in str(w.message) for w in caught)
    assert len(task.labels["test"]) == 10_000
    assert len(task.labels["train"]) + len(task.labels["valid"]) == 10_000
    one_step(task)


def test_real_chinese_poems() -> None:
    folder = _shared("chinese_poems")
    task = make("chinese_poems", data_dir=str(folder), variant="5")
    task.prepare()
    assert task.splits["train"].numel() == 11_274 * 24  # 4 lines x (5 chars + a break)
    assert len(task.vocab) > 2000


@pytest.mark.parametrize("variant", ["all", "5", "7"])
def test_chinese_poems_vocabulary_size_known_without_the_data(variant: str) -> None:
    """The size that --print-params sizes the models with is the published data's."""
    task = make("chinese_poems", data_dir=str(_shared("chinese_poems")), variant=variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qtrain is qtrain5 + qtrain7 here
        task.prepare()
    assert task.known_vocab_size() == len(task.vocab)


def test_real_tinyshakespeare() -> None:
    folder = _shared("tinyshakespeare")
    task = make("text_file", path=str(folder / "input.txt"))
    task.prepare()
    assert len(task.vocab) == 65
    assert sum(v.numel() for v in task.splits.values()) == 1_115_394


def test_options_dataclasses_are_plain() -> None:
    for name in BUILTIN:
        options = get_task(name).factory.Options
        assert dataclasses.is_dataclass(options)
