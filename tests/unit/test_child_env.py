"""The environment the supervisor gives its children."""
from __future__ import annotations

import os

import psutil

from daemon.children import OMP_SPINCOUNT, compute_env, default_threads


def test_children_get_a_bounded_openmp_spin_and_unbuffered_output():
    env = compute_env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "PYTHONUNBUFFERED": "1", "GOMP_SPINCOUNT": OMP_SPINCOUNT}


def test_an_operators_openmp_settings_win():
    assert compute_env({"OMP_WAIT_POLICY": "ACTIVE"}).get("GOMP_SPINCOUNT") is None
    assert compute_env({"GOMP_SPINCOUNT": "5"})["GOMP_SPINCOUNT"] == "5"
    assert compute_env({"PYTHONUNBUFFERED": "0"})["PYTHONUNBUFFERED"] == "0"


def test_the_callers_mapping_is_not_changed():
    base = {"A": "1"}
    compute_env(base)
    assert base == {"A": "1"}


def test_engines_get_the_usable_cpus_less_one_unless_threads_are_set():
    usable = len(os.sched_getaffinity(0))
    cores = psutil.cpu_count(logical=False) or usable
    assert default_threads() == max(1, min(usable - 1, cores))   # SMT siblings not counted
    assert compute_env({}, 0)["OMP_NUM_THREADS"] == str(default_threads())
    assert compute_env({}, 3)["OMP_NUM_THREADS"] == "3"          # [engines] threads
    assert compute_env({"OMP_NUM_THREADS": "7"}, 3)["OMP_NUM_THREADS"] == "7"   # the operator's
    assert "OMP_NUM_THREADS" not in compute_env({})             # frontends: torch-free
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})                   # a one-CPU slice of the host
        assert default_threads() == 1
    finally:
        os.sched_setaffinity(0, before)
