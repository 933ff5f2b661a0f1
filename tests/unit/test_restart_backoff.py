"""Restart delays: a child that had been serving restarts after the schedule's first step (0 by
default); deaths while starting, or soon after coming up, climb the schedule."""
from __future__ import annotations

import time

from daemon.children import STABLE_S, Child, backoff_for
from daemon.config import EnginesConfig

SCHEDULE = (0.0, 0.5, 1.0, 2.0)


def _child(healthy_for: float | None) -> Child:
    c = Child("engine-cpu", "engine", {})
    now = time.monotonic()
    c.started_at = now - (healthy_for or 0.0) - 1.0
    c.healthy_at = None if healthy_for is None else now - healthy_for
    return c


def test_the_default_schedule_restarts_a_serving_child_at_once():
    assert EnginesConfig().restart_backoff_s[0] == 0.0
    child = _child(healthy_for=STABLE_S + 1)
    assert backoff_for(child, EnginesConfig().restart_backoff_s) == 0.0


def test_a_child_that_served_long_enough_starts_the_schedule_over():
    child = _child(healthy_for=STABLE_S + 1)
    child.failures = 3                      # earlier crash loop, since recovered
    assert backoff_for(child, SCHEDULE) == 0.0
    assert child.failures == 1


def test_deaths_during_start_up_climb_the_schedule_and_the_last_step_repeats():
    child = _child(healthy_for=None)        # never finished starting
    assert [backoff_for(child, SCHEDULE) for _ in range(6)] == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_death_soon_after_coming_up_counts_as_a_quick_one():
    child = _child(healthy_for=STABLE_S + 1)
    assert backoff_for(child, SCHEDULE) == 0.0      # the first crash: at once
    child.healthy_at = time.monotonic() - 0.5        # came back, died again 0.5 s later
    assert backoff_for(child, SCHEDULE) == 0.5
    child.healthy_at = time.monotonic() - 0.5
    assert backoff_for(child, SCHEDULE) == 1.0


def test_an_operators_first_step_is_kept():
    child = _child(healthy_for=STABLE_S + 1)
    assert backoff_for(child, (1.5,)) == 1.5
