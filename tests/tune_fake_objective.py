"""Fast fake objectives of the tuning tests (importable by worker subprocesses too)."""

from __future__ import annotations

import os
import time


def quadratic(trial, reporter) -> float:
    """Deterministic in the parameters: minus the squared distance to the middle of [0, 1]
    (log-scaled parameters enter through their log). ``FAKE_TRIAL_SLEEP`` seconds per step."""
    import math

    sleep = float(os.environ.get("FAKE_TRIAL_SLEEP", "0"))
    score = -sum((math.log10(v) if v > 1 else v - 0.5) ** 2 for v in trial.params.values())
    trial.output.mkdir(parents=True, exist_ok=True)
    for step in range(1, 4):
        time.sleep(sleep)
        reporter.report(score - (3 - step) * 0.1, step)
    return score


def worse_each_trial(trial, reporter) -> float:
    """Later trials look worse at every step: the median pruner prunes them."""
    value = -float(trial.number)
    for step in range(1, 4):
        reporter.report(value, step)
    return value


def failing(trial, reporter) -> float:
    raise RuntimeError(f"broken trial {trial.number}")
