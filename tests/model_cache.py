"""Where the tests keep the models they build (git-ignored), and the step tests/run.sh runs
before pytest so the first test to ask for the demo models does not train them under its
timeout: `python -m tests.model_cache`."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the demo repository is built from: an edit to any of these rebuilds it
_DEMO_SOURCES = ("daemon/demo.py", "engines/diffusion/digits.py", "engines/diffusion/tiny.py")


def cache_dir() -> Path:
    return Path(os.environ.get("FERRY_TEST_MODELS", REPO / "var" / "test-models"))


def demo_models_root() -> Path:
    digest = hashlib.sha256()
    for name in _DEMO_SOURCES:
        digest.update((REPO / name).read_bytes())
    return cache_dir() / digest.hexdigest()[:12]


def prepare() -> Path:
    from daemon.demo import prepare_demo_models

    root = demo_models_root()
    prepare_demo_models(root)
    return root


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # (no bounded OpenMP spin here, unlike tests/conftest.py: this runs alone, before the
    # tests, and training with spinning threads is ~40% faster on idle cores)
    t0 = time.monotonic()
    root = prepare()
    from tests.torch_models import cached_cnn

    cached_cnn()
    logging.info("test models ready under %s in %.0f s", root, time.monotonic() - t0)


if __name__ == "__main__":
    main()
