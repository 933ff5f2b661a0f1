"""Fixtures shared by every test directory. Keep this file small."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# transformers must never reach for the hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The bounded OpenMP spin Ferry gives its engines (daemon/children.py), for the torch code the
# tests run in this process too: it shares the cores with the daemons the tests start.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The demo model repository, built once per version of daemon/demo.py and then reused.

    Lives under $FERRY_TEST_MODELS or var/test-models (git-ignored), keyed by the hash of its
    builders so an edit to them rebuilds it (tests/model_cache.py; tests/run.sh builds it
    before pytest starts).
    """
    from tests.model_cache import prepare

    return prepare()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors (`pytest.mark.usefixtures("one_torch_thread")`): intra-op
    threads gain nothing there, and on a busy host two threads stall on each other at every
    op. Restores the process setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
