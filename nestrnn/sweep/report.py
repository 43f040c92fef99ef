"""The end of a sweep: a table of its trials, the best one, and ``SWEEP/best.yaml``."""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from nestrnn.sweep.spec import Spec
from nestrnn.sweep.worker import CONFIGS, run_number


def format_table(spec: Spec, trials: list[optuna.trial.FrozenTrial]) -> str:
    """One line per trial: number, state, value (mean over seeds), its parameters or reason."""
    rows = [("trial", "runs", "state", spec.metric, "parameters")]
    for t in trials:
        value = "" if t.value is None or not math.isfinite(t.value) else f"{t.value:.4g}"
        note = t.user_attrs.get("fail_reason") or t.user_attrs.get("pruned") or ""
        if t.state == optuna.trial.TrialState.FAIL and not note:
            note = "its worker stopped; retried"
        params = t.user_attrs.get("label", "")
        rows.append(
            (
                str(t.number),
                f"{run_number(t):04d}",
                t.state.name.lower(),
                value,
                params + (f"  ({note})" if note else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    )


def finish(spec: Spec, study: optuna.Study, sweep_dir: Path) -> None:
    """Print the table and the best trial; write ``best.yaml`` (the best trial's config)."""
    trials = study.get_trials(deepcopy=False)
    print(format_table(spec, trials))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("no trial completed")
        return
    best = study.best_trial
    print(
        f"best: trial {best.number}, {spec.metric} {best.value:.4g} "
        f"(mean of {len(spec.seeds)} seed(s)): {best.user_attrs.get('label', '')}"
    )
    source = sweep_dir / CONFIGS / f"{run_number(best):04d}-seed{spec.seeds[0]}.yaml"
    (sweep_dir / "best.yaml").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"best config: {sweep_dir / 'best.yaml'} (nestrnn train -c {sweep_dir / 'best.yaml'})")
