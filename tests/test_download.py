"""Downloads against a local HTTP server: checksums, truncation, atomic writes, base URL overrides."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_tasks import TINY, http_server, run_cli, write_mnist, write_ptb, write_text8_zip

from nestrnn.data_utils import (
    DataError,
    RemoteFile,
    atomic_write,
    base_urls,
    download,
    fetch,
    sha256_file,
)
from nestrnn.registry import get_task


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def served(tmp_path: Path) -> Path:
    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "good.bin").write_bytes(b"0123456789" * 1000)
    return folder


def test_download_verifies_and_writes_atomically(served: Path, tmp_path: Path) -> None:
    data = (served / "good.bin").read_bytes()
    dest = tmp_path / "out" / "good.bin"
    with http_server(served) as url:
        download(url + "good.bin", dest, sha256=_sha(data), size=len(data), progress=False)
    assert dest.read_bytes() == data
    assert _leftovers(dest.parent) == []


def test_checksum_mismatch_is_an_error_and_leaves_nothing(served: Path, tmp_path: Path) -> None:
    dest = tmp_path / "good.bin"
    with http_server(served) as url, pytest.raises(DataError) as info:
        download(url + "good.bin", dest, sha256="0" * 64, progress=False)
    assert "checksum mismatch" in str(info.value) and "good.bin" in str(info.value)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_broken_off_transfer_is_detected(served: Path, tmp_path: Path) -> None:
    dest = tmp_path / "good.bin"
    with http_server(served, cut={"good.bin": 4000}) as url, pytest.raises(DataError) as info:
        download(url + "good.bin", dest, progress=False)
    message = str(info.value)
    assert "good.bin" in message and ("truncated" in message or "broke off" in message)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_wrong_size_and_validator(served: Path, tmp_path: Path) -> None:
    dest = tmp_path / "good.bin"
    with http_server(served) as url:
        with pytest.raises(DataError, match="canonical file has 5 bytes"):
            download(url + "good.bin", dest, size=5, progress=False)

        def reject(path: Path) -> None:
            assert path != dest and path.exists()  # validated before it gets its name
            raise DataError(f"{path.name} looks wrong")

        with pytest.raises(DataError, match="looks wrong"):
            download(url + "good.bin", dest, validate=reject, progress=False)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_a_download_without_length_is_not_read_past_its_limit(tmp_path: Path) -> None:
    """A server that sends no Content-Length and never stops: reading ends at the first byte
    beyond the known size (or a task's max_size), not at the end of the stream."""
    sent = [0]
    with http_server(tmp_path, endless=["big.bin"], sent=sent) as url:
        with pytest.raises(DataError, match="more than 1,000 bytes, but the canonical file has"):
            download(url + "big.bin", tmp_path / "a" / "big.bin", size=1000, progress=False)
        remote = RemoteFile("big.bin", max_size=5000)
        with pytest.raises(DataError, match="more than 5,000 bytes, but expected at most 5,000"):
            fetch(remote, tmp_path / "b", [url], progress=False)
    assert sent[0] < 64 << 20  # the server stopped when the client hung up (1 GB otherwise)
    assert not (tmp_path / "a" / "big.bin").exists() and _leftovers(tmp_path / "a") == []
    assert not (tmp_path / "b" / "big.bin").exists()


def test_a_data_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DataError, match="data folder .*data is a file; point task.data_dir"):
        fetch(RemoteFile("x.bin"), tmp_path / "data", ["http://127.0.0.1:9/"], progress=False)


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "shared.bin") as handle:
            handle.write(b"data")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o640


def test_fetch_tries_mirrors_in_order(served: Path, tmp_path: Path) -> None:
    data = (served / "good.bin").read_bytes()
    remote = RemoteFile("good.bin", _sha(data), len(data))
    with http_server(tmp_path / "server") as good, http_server(tmp_path) as missing:
        path = fetch(remote, tmp_path / "data", [missing + "nothing/", good], progress=False)
    assert path.read_bytes() == data
    # an existing good file is used as is; a corrupt one is named
    assert fetch(remote, tmp_path / "data", [], progress=False) == path
    path.write_bytes(data[:-1])
    with pytest.raises(DataError, match=r"good\.bin is truncated"):
        fetch(remote, tmp_path / "data", [])
    path.write_bytes(data[:-1] + b"x")
    with pytest.raises(DataError, match=r"good\.bin is corrupt: sha256"):
        fetch(remote, tmp_path / "data", [])


def test_a_download_removes_what_killed_downloads_left(served: Path, tmp_path: Path) -> None:
    """Temporary files a SIGKILL left go; a recent one, maybe another process's, stays."""
    data = (served / "good.bin").read_bytes()
    folder = tmp_path / "data"
    folder.mkdir()
    stale, recent = folder / ".good.bin.0badf00d.tmp", folder / ".good.bin.c0ffee00.tmp"
    for leftover in (stale, recent):
        leftover.write_bytes(data[:100])
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    with http_server(served) as url:
        fetch(RemoteFile("good.bin", _sha(data), len(data)), folder, [url], progress=False)
    assert _leftovers(folder) == [recent.name]


def test_missing_and_downloads_disabled(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="downloads are disabled.*do this"):
        fetch(
            RemoteFile("x.bin"),
            tmp_path,
            ["http://127.0.0.1:9/"],
            allow_download=False,
            how_to="do this",
        )
    with pytest.raises(DataError, match="could not obtain x.bin: cannot download"):
        fetch(RemoteFile("x.bin"), tmp_path, ["http://127.0.0.1:9/"], progress=False)


def test_atomic_write_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as handle:
        handle.write("new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_base_urls_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NESTRNN_X_URL", raising=False)
    assert base_urls("", "NESTRNN_X_URL", ["https://a/"]) == ["https://a/"]
    monkeypatch.setenv("NESTRNN_X_URL", "http://b/, http://c/")
    assert base_urls("", "NESTRNN_X_URL", ["https://a/"]) == ["http://b/", "http://c/"]
    assert base_urls("http://d/", "NESTRNN_X_URL", ["https://a/"]) == ["http://d/"]


# --------------------------------------------------------------------------- tasks downloading


def _task(name: str, **options):
    cls = get_task(name).factory
    return cls(cls.Options(**options))


def test_mnist_downloads_with_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nestrnn.tasks import mnist_glimpses as mg

    paths = write_mnist(tmp_path / "server")
    table = {
        role: RemoteFile(p.name, sha256_file(p), p.stat().st_size) for role, p in paths.items()
    }
    monkeypatch.setattr(mg, "FILES", table)
    data_dir = tmp_path / "data"
    with http_server(tmp_path / "server") as url:
        task = _task("mnist_glimpses", data_dir=str(data_dir), base_url=url)
        task.prepare()
    assert len(task.labels["test"]) == 40
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(p.name for p in paths.values())

    # a checksum that does not match: nothing is written, the error names the file and URL
    bad = dict(table, test_labels=RemoteFile(table["test_labels"].name, "f" * 64))
    monkeypatch.setattr(mg, "FILES", bad)
    other = tmp_path / "other"
    mismatch = r"checksum mismatch for .*t10k-labels-idx1-ubyte\.gz"
    with http_server(tmp_path / "server") as url, pytest.raises(DataError, match=mismatch):
        _task("mnist_glimpses", data_dir=str(other), base_url=url).prepare()
    assert not (other / table["test_labels"].name).exists()


def test_mnist_truncated_download_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nestrnn.tasks import mnist_glimpses as mg

    paths = write_mnist(tmp_path / "server")
    images = paths["test_images"]
    images.write_bytes(images.read_bytes()[:-200])  # a truncated file on the server
    table = {role: RemoteFile(p.name) for role, p in paths.items()}  # checksums unknown
    monkeypatch.setattr(mg, "FILES", table)
    data_dir = tmp_path / "data"
    with http_server(tmp_path / "server") as url, pytest.raises(DataError) as info:
        _task("mnist_glimpses", data_dir=str(data_dir), base_url=url).prepare()
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)
    assert not (data_dir / images.name).exists()


def test_ptb_downloads_from_env_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_ptb(tmp_path / "server")
    with http_server(tmp_path / "server") as url:
        monkeypatch.setenv("NESTRNN_PTB_URL", url)
        task = _task("ptb_char", data_dir=str(tmp_path / "data"))
        task.prepare()
    assert (tmp_path / "data" / "ptb.char.valid.txt").exists()
    assert len(task.vocab) > 10


def test_text8_download_and_canonical_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_text8_zip(tmp_path / "server", 1200)
    options = {"train_chars": 1000, "valid_chars": 100, "test_chars": 100}
    with http_server(tmp_path / "server") as url:
        task = _task("text8", data_dir=str(tmp_path / "data"), base_url=url, **options)
        task.prepare()
        assert task.splits["valid"].numel() == 100
        # with the canonical split the canonical checksum and size apply: a wrong file is refused
        with pytest.raises(DataError, match="canonical file has 31,344,016 bytes"):
            _task("text8", data_dir=str(tmp_path / "canonical"), base_url=url).prepare()
    assert not (tmp_path / "canonical" / "text8.zip").exists()


SMALL_TEXT8 = ["task.train_chars=1000", "task.valid_chars=100", "task.test_chars=100"]


def test_text8_with_another_split_does_not_read_an_endless_download(tmp_path: Path) -> None:
    """Without the canonical size, a text8.zip download is bounded by the split: no zip of 1,200
    characters is longer than that plus the zip's overhead."""
    sent = [0]
    data = tmp_path / "data"
    options = {"train_chars": 1000, "valid_chars": 100, "test_chars": 100}
    too_long = r"text8\.zip has more than [\d,]+ bytes"
    with http_server(tmp_path, endless=["text8.zip"], sent=sent) as url:
        task = _task("text8", data_dir=str(data), base_url=url, **options)
        with pytest.raises(DataError, match=too_long):
            task.prepare()
    assert sent[0] < 64 << 20
    assert not (data / "text8.zip").exists() and _leftovers(data) == []


def test_a_trickling_download_stops_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that sends a byte now and then never lets a read time out; the overall deadline
    of $NESTRNN_DOWNLOAD_DEADLINE seconds per file ends the download."""
    dest = tmp_path / "data" / "slow.bin"
    monkeypatch.setenv("NESTRNN_DOWNLOAD_DEADLINE", "1")
    with http_server(tmp_path, trickle=["slow.bin"]) as url:
        with pytest.raises(
            DataError, match=r"slow\.bin took longer than 1 s.*NESTRNN_DOWNLOAD_DEADLINE"
        ):
            download(url + "slow.bin", dest, progress=False)
        monkeypatch.setenv("NESTRNN_DOWNLOAD_DEADLINE", "soon")
        with pytest.raises(
            DataError, match="NESTRNN_DOWNLOAD_DEADLINE must be a number of seconds"
        ):
            download(url + "slow.bin", dest, progress=False)
    assert not dest.exists() and _leftovers(dest.parent) == []


def _cli_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed ``nestrnn train``; apart from it, stderr only says what it
    downloaded (and why that failed, indented)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("nestrnn train: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(line.startswith(("downloading ", " ", "warning: ")) for line in lines[:-1])
    return errors[0]


@pytest.mark.parametrize("server", ["endless", "trickle"])
def test_the_cli_stops_an_endless_or_trickling_download(tmp_path: Path, server: str) -> None:
    data = tmp_path / "data"
    with http_server(tmp_path, **{server: ["text8.zip"]}) as url:
        result = run_cli(
            [
                "train",
                "task.name=text8",
                f"task.data_dir={data}",
                f"task.base_url={url}",
                *SMALL_TEXT8,
                *TINY,
                "--run-dir",
                str(tmp_path / "run"),
            ],
            cwd=tmp_path,
            env={"NESTRNN_DOWNLOAD_DEADLINE": "2"},
        )
    error = _cli_error(result)
    assert "text8.zip" in error
    assert ("has more than" if server == "endless" else "took longer than 2 s") in error
    assert not data.exists() or _leftovers(data) == []
    assert not (tmp_path / "run").exists()


def _on_a_tiny_disk(folder: Path, size: str) -> list[str]:
    """A command prefix that runs a command with ``folder`` on a new tmpfs of ``size`` (in a mount
    namespace of its own), then prints ``LEFT:`` and what the folder holds."""
    script = 'mount -t tmpfs -o size="$1" tmpfs "$0" || exit 99; shift; "$@"; rc=$?; echo "LEFT:$(ls -A "$0")"; exit $rc'
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-r", "--mount"]
    prefix = [*namespace, "sh", "-c", script, str(folder), size]
    if (
        shutil.which("unshare") is None
        or subprocess.run([*prefix, "true"], capture_output=True).returncode
    ):
        pytest.skip("no mount namespace to make a small disk in")
    return prefix


def test_a_full_disk_during_a_download(tmp_path: Path) -> None:
    """ENOSPC while the download is written: one line naming the folder, no temporary file."""
    split = ["task.train_chars=800000", "task.valid_chars=100000", "task.test_chars=100000"]
    served = write_text8_zip(tmp_path / "server", 1_000_000)
    assert served.stat().st_size > 64 << 10  # twice the disk
    data = tmp_path / "data"
    data.mkdir()
    with http_server(tmp_path / "server") as url:
        command = [
            sys.executable,
            "-m",
            "nestrnn",
            "train",
            "task.name=text8",
            f"task.data_dir={data}",
            f"task.base_url={url}",
            *split,
            *TINY,
            "--run-dir",
            str(tmp_path / "run"),
        ]
        result = subprocess.run(
            [*_on_a_tiny_disk(data, "32k"), *command], capture_output=True, text=True, timeout=120
        )
    error = _cli_error(result)
    assert f"no space left on the disk of {data}" in error and "free" in error
    assert result.stdout.splitlines()[-1] == "LEFT:"
