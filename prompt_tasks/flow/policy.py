"""Each stage's policy, in one table: time limits, how many retries, and the backoff between them.

The wait is pure I/O and cheap to repeat; prepare and run talk to the registry, which needs
longer to come back. ``wait`` bounds itself (its timeout is the visit's end plus a margin), so
its time limits only catch a runaway. The broker's visibility timeout must exceed the longest
``time_limit``, or a long stage runs twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

__all__ = ["POLICIES", "StagePolicy", "backoff", "jittered", "policy_options", "retry_countdown"]


@dataclass(frozen=True)
class StagePolicy:
    """Time limits, retries and backoff of one stage.

    The wait before retry ``n + 1`` is ``backoff_base_s * 2**n`` capped at ``backoff_cap_s``,
    times a random factor from ``jitter`` (which spreads the retries of many detectors apart).
    """

    soft_time_limit: float
    time_limit: float
    max_retries: int
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    jitter: tuple[float, float] = (0.8, 1.4)


#: Stage name → policy.
POLICIES: dict[str, StagePolicy] = {
    "prepare": StagePolicy(soft_time_limit=300.0, time_limit=330.0, max_retries=3,
                           backoff_base_s=1.0, backoff_cap_s=30.0),
    "wait": StagePolicy(soft_time_limit=3000.0, time_limit=3060.0, max_retries=5,
                        backoff_base_s=0.5, backoff_cap_s=15.0),
    "ingest": StagePolicy(soft_time_limit=120.0, time_limit=150.0, max_retries=3,
                          backoff_base_s=0.5, backoff_cap_s=15.0),
    "run": StagePolicy(soft_time_limit=600.0, time_limit=660.0, max_retries=1,
                       backoff_base_s=1.0, backoff_cap_s=30.0),
    # the raw-calibration route (prompt_tasks.daytime.calibration): ingest + preload + run in one task
    "calib": StagePolicy(soft_time_limit=600.0, time_limit=660.0, max_retries=3),
}


def policy_options(stage: str) -> dict[str, Any]:
    """Task decorator options of ``stage`` (its time limits)."""
    policy = POLICIES[stage]
    return {"soft_time_limit": policy.soft_time_limit, "time_limit": policy.time_limit}


def jittered(delay: float, policy: StagePolicy, rng: random.Random | None = None) -> float:
    """``delay`` scaled by a random factor from the policy's jitter range (never negative)."""
    low, high = policy.jitter
    return max(0.0, delay) * (rng or random).uniform(low, high)


def backoff(retries: int, policy: StagePolicy, hint: float | None = None,
            rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``retries + 1``.

    ``hint`` (a :class:`~prompt_tasks.errors.RetryLater`'s own delay) replaces the policy's
    base; the exponential growth and the cap apply either way, then the jitter (never above
    the cap).
    """
    base = policy.backoff_base_s if hint is None else max(0.0, hint)
    delay = min(policy.backoff_cap_s, base * (2 ** max(0, retries)))
    return min(policy.backoff_cap_s, jittered(delay, policy, rng))


def retry_countdown(stage: str, retries: int, hint: float | None = None) -> float:
    """Countdown before retry ``retries + 1`` of ``stage``."""
    return backoff(retries, POLICIES[stage], hint=hint)
