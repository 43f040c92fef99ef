"""The Markdown tables of measured figures in the docs, rendered from ``benchmarks/results/*.json``.

    python benchmarks/tables.py           # rewrite every marked region
    python benchmarks/tables.py --check   # exit status 1 if a region differs from its JSON

A region is ``<!-- table:NAME -->`` ... ``<!-- /table -->`` in one of ``DOCS``; ``TABLES[NAME]``
renders it. Figures are never typed into the docs by hand, so they cannot drift from the files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
DOCS = ("README.md", "benchmarks/README.md", "docs/design.md")
REGION = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def rows(name: str) -> list[dict]:
    """The rows of ``benchmarks/results/NAME.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())["rows"]


def ratio(results: list[dict], shape: tuple[int, int, int], row: str, vs: str) -> str:
    """``fwd / f+b`` ratio of ``row`` against ``vs`` at ``shape`` ('' where not measured). Files
    of the speed.py before the custom operators hold one row a depth, ``NLSTM-D`` against
    ``LSTM-D`` (``*_ratio_vs_lstm_same``)."""
    for r in results:
        if (r["B"], r["H"], r["T"]) != shape:
            continue
        if r.get("row") == row and vs in r["vs"]:
            return f"{r['vs'][vs]['fwd_ratio']:.2f} / {r['vs'][vs]['fwd+bwd_ratio']:.2f}"
        if "row" not in r and row == f"NLSTM-{r['depth']}" and vs == f"LSTM-{r['depth']}":
            return f"{r['fwd_ratio_vs_lstm_same']:.2f} / {r['fwd+bwd_ratio_vs_lstm_same']:.2f}"
    return ""


def shapes(*results: list[dict]) -> list[tuple[int, int, int]]:
    """Every (B, H, T) of the files, in the order first measured."""
    return list(dict.fromkeys((r["B"], r["H"], r["T"]) for rs in results for r in rs))


def table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(c.strip() for c in cells) + " |" for cells in (head, *body)]
    lines.insert(1, "|" + "---|" * len(head))
    return "\n".join(lines) + "\n"


def depth_table(columns: dict[str, str], depths=(1, 2, 3)) -> str:
    """NLSTM-D / LSTM-D by shape and depth, one column per result file."""
    files = {title: rows(name) for title, name in columns.items()}
    body = [
        [", ".join(map(str, shape)), str(d)]
        + [ratio(rs, shape, f"NLSTM-{d}", f"LSTM-{d}") for rs in files.values()]
        for shape in shapes(*files.values())
        for d in depths
    ]
    body = [line for line in body if any(line[2:])]
    return table(["(B, H, T)", "D", *columns], body)


def cuda_dtypes() -> str:
    """Depth 2 on the GPU against cuDNN's two layers, one column per dtype."""
    files = {d: rows(f"speed_cuda_{d}") for d in ("float32", "bfloat16", "float16")}
    body = [
        [f"({', '.join(map(str, shape))})"]
        + [ratio(rs, shape, "NLSTM-2", "LSTM-2") for rs in files.values()]
        for shape in shapes(*files.values())
    ]
    return table(["(B, H, T)", *files], body)


#: how the tables name a baseline of speed.py's rows
BASELINES = {"LSTM-1": "nn.LSTM(H, H, 1)"}


def other_rows(name: str) -> str:
    """The rows of a file beside the depth rows (variants, user memory functions), each against
    its baseline."""
    body = []
    for r in rows(name):
        if r.get("group", "depth") != "depth":
            vs = next(iter(r["vs"]))
            shape = (r["B"], r["H"], r["T"])
            cells = [", ".join(map(str, shape)), r["row"], BASELINES.get(vs, vs)]
            body.append([*cells, ratio([r], shape, r["row"], vs)])
    return table(["(B, H, T)", "row", "against", "ratio"], body)


def regularisers_by_dtype(names: dict[str, str]) -> str:
    """speed.py --regularisers rows against the same layer, one column per file (dtype)."""
    files = {title: rows(name) for title, name in names.items()}
    first = next(iter(files.values()))
    body = []
    for r in first:
        if r.get("group") != "regulariser" or not r["vs"]:
            continue
        shape, vs = (r["B"], r["H"], r["T"]), next(iter(r["vs"]))
        cells = [", ".join(map(str, shape)), r["row"]]
        body.append(cells + [ratio(rs, shape, r["row"], vs) for rs in files.values()])
    return table(["(B, H, T)", "row", *files], body)


def long_sequences(name: str) -> str:
    """long_sequences.py's rows: the training step's own peak memory by T, with and without
    segment recomputation."""
    body = []
    for r in rows(name):
        every = str(r["checkpoint_every"] or "off")
        memory = f"{r['step_mib']:,.0f}" if r["fits"] else "did not fit"
        seconds = f"{r['seconds']:.0f}" if r["fits"] else "-"
        body.append([f"{r['T']:,}", every, memory, seconds])
    return table(["T", "checkpoint_every", "step memory (MiB)", "seconds"], body)


TABLES: dict[str, Callable[[], str]] = {
    "cpu-before-after": lambda: depth_table(
        {
            "1 thread, CPU time: before": "speed_cpu_before_1thread",
            "after": "speed_cpu_after_1thread",
            "2 threads, wall: before": "speed_cpu_before_2threads",
            "after ": "speed_cpu_after_2threads",
        }
    ),
    "cpu-repeats": lambda: depth_table(
        {"15 repeats": "speed_cpu_reference_shapes", "7 repeats": "speed_cpu"}
    ),
    "cuda-dtypes": cuda_dtypes,
    "cpu-variants-memories": lambda: other_rows("speed_cpu_variants_memories"),
    "cpu-regularisers": lambda: other_rows("speed_cpu_regularisers"),
    "long-sequences": lambda: long_sequences("long_sequences_cpu"),
    "cuda-regularisers": lambda: regularisers_by_dtype(
        {
            "float32": "speed_regularisers_cuda_float32",
            "bfloat16": "speed_regularisers_cuda_bfloat16",
        }
    ),
}


def render(text: str) -> str:
    """``text`` with every marked region replaced by its table."""

    def replace(match: re.Match) -> str:
        if match[2] not in TABLES:
            raise SystemExit(f"tables.py: unknown table {match[2]!r}")
        return match[1] + TABLES[match[2]]() + match[4]

    return REGION.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tables.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="change nothing; 1 if out of date")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = REPO_ROOT / doc
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"tables.py: out of date: {', '.join(stale)} (run python benchmarks/tables.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
