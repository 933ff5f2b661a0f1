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
    stopped_cleanly(d)


# The tiny random Stable Diffusion pipeline (engines/diffusion/tiny.py) as the diffusion test
# modules serve it: two steps by default, up to 1000 for the cancellation tests.
TINY_SD_TOML = """engine = "diffusion"

[diffusion]
default_steps = 2
max_steps = 1000
max_batch = 4
max_size = 64
"""


def stopped_cleanly(d: Daemon) -> None:
    """Stop `d`; it exited 0 and left no shared-memory segment behind."""
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


@pytest.fixture(scope="session")
def tiny_sd_daemon(tmp_path_factory: pytest.TempPathFactory):
    """One daemon serving the tiny SD pipeline as model `tiny`, shared by the diffusion
    modules (each compares metrics before and after, never absolute counts)."""
    pytest.importorskip("diffusers")
    from engines.diffusion.tiny import build_tiny_sd
    repo = tmp_path_factory.mktemp("repo")
    build_tiny_sd(repo / "tiny" / "1" / "pipeline")
    (repo / "tiny" / "1" / "model.toml").write_text(TINY_SD_TOML)
    d = Daemon(repo, workers=1, env={"OMP_NUM_THREADS": "1"}).start(timeout_s=180)
    yield d
    stopped_cleanly(d)


@pytest.fixture(scope="session")
def digits_diffusion_daemon(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """One daemon serving the digits classifier and the digits diffusion demo model."""
    pytest.importorskip("diffusers")
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "digits-diffusion")),
               workers=1).start(timeout_s=180)
    yield d
    stopped_cleanly(d)


@pytest.fixture(scope="module")
def client(ferry):
    """The `openai` package's client, unchanged, on the module's own `ferry` daemon."""
    import openai
    c = openai.OpenAI(base_url=ferry.url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield c
    c.close()
