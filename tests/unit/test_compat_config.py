"""[compat]: root names a seed or nothing; anything else stops `ferry serve` naming the key."""
from __future__ import annotations

import pytest

from daemon.config import COMPAT_SEEDS, load_config
from daemon.errors import ConfigError


def _load(tmp_path, text: str):
    path = tmp_path / "ferry.toml"
    path.write_text(text)
    return load_config(path, env={})


def test_defaults_keep_ferrys_routes():
    cfg = load_config(env={})
    assert cfg.compat.root == "" and cfg.compat.text_model == ""


@pytest.mark.parametrize("seed", COMPAT_SEEDS)
def test_every_seed_can_be_the_root(tmp_path, seed):
    assert _load(tmp_path, f'[compat]\nroot = "{seed}"\n').compat.root == seed


@pytest.mark.parametrize("text,key", [
    ('[compat]\nroot = "openai"\n', "compat.root"),
    ('[compat]\nroot = 3\n', "compat.root"),
    ('[compat]\nmount = "x"\n', "compat.mount"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert key in str(info.value)

