"""Fixtures shared by every test directory. Keep this file small."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# transformers must never reach for the hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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

    Lives under $FERRY_TEST_MODELS or var/test-models (git-ignored), keyed by demo.py's hash so
    an edit to the builder rebuilds it.
    """
    from daemon.demo import prepare_demo_models

    key = hashlib.sha256((REPO / "daemon" / "demo.py").read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("FERRY_TEST_MODELS", REPO / "var" / "test-models"))
    root = base / key
    prepare_demo_models(root)
    return root


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
