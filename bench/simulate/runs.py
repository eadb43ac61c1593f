"""Running the engine: one policy, every policy, or kiropool with each
dispatcher variant, on the same traffic; optionally spread over processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from bench.simulate.engine import simulate
from bench.simulate.policies import policy_build
from bench.simulate.results import RunResult
from bench.simulate.scenario import Knobs, Pool
from bench.simulate.traffic import Traffic
from bench.simulate.variants import PLAIN, Dispatcher


def simulate_policy(
    name: str, pool: Pool, knobs: Knobs, traffic: Traffic, seed: int, dispatcher: Dispatcher = PLAIN
) -> RunResult:
    policy = policy_build(name, seed=seed, litellm_buffer=knobs.litellm_buffer, litellm_window=knobs.litellm_window)
    return simulate(pool, knobs, traffic, policy, dispatcher)


def _runs(jobs: int, calls: list[tuple]) -> list[RunResult]:
    """``simulate_policy`` over argument tuples, in order. Runs are independent,
    so spreading them over processes changes nothing but the wall time."""
    if jobs <= 1 or len(calls) <= 1:
        return [simulate_policy(*args) for args in calls]
    with ProcessPoolExecutor(max_workers=min(jobs, len(calls))) as executor:
        futures = [executor.submit(simulate_policy, *args) for args in calls]
        return [f.result() for f in futures]


def simulate_all(
    names: Sequence[str], pool: Pool, knobs: Knobs, traffic: Traffic, *, seed: int, jobs: int = 1
) -> list[RunResult]:
    """Every policy on the same traffic, with today's dispatcher, in ``names`` order."""
    return _runs(jobs, [(n, pool, knobs, traffic, seed) for n in names])


def simulate_dispatchers(
    dispatchers: Sequence[Dispatcher], pool: Pool, knobs: Knobs, traffic: Traffic, *, seed: int, jobs: int = 1
) -> list[RunResult]:
    """kiropool's ordering with each dispatcher on the same traffic, in order.
    Dispatchers with the same features run once and share the result."""
    unique: dict[tuple, Dispatcher] = {}
    for d in dispatchers:
        unique.setdefault(d.features(), d)
    done = _runs(jobs, [("kiropool", pool, knobs, traffic, seed, d) for d in unique.values()])
    by_features = dict(zip(unique, done, strict=True))
    return [_renamed(by_features[d.features()], d.name) for d in dispatchers]


def _renamed(result: RunResult, name: str) -> RunResult:
    return result if result.policy == name else dataclasses.replace(result, policy=name)
