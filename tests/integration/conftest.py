"""Integration fixtures: a real `ferry serve` on the demo models, shared by a test module."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.daemon_proc import Daemon, orphan_segments


def tensor_repo(demo_models: Path, tmp_path_factory: pytest.TempPathFactory,
                names: tuple[str, ...] = ("minilm", "digits")) -> Path:
    """A repository holding only `names`, as symlinks into the demo repository."""
    root = tmp_path_factory.mktemp("repo")
    for name in names:
        (root / name).symlink_to(demo_models / name, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def daemon(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory)).start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


@pytest.fixture(scope="module")
def client(ferry):
    """The `openai` package's client, unchanged, on the module's own `ferry` daemon."""
    import openai
    c = openai.OpenAI(base_url=ferry.url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield c
    c.close()
