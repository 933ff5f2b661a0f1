"""The model repository on disk: which `<name>/<version>/model.toml` count, and version policies."""
from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.repository import scan, select_versions

pytestmark = pytest.mark.timeout(30)


def _version(root: Path, rel: str, toml: bool = True) -> Path:
    d = root / rel
    d.mkdir(parents=True)
    if toml:
        (d / "model.toml").write_text('engine = "onnx"\nweights = "model.onnx"\n')
    return d


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "models"
    for rel in ("digits/1", "digits/2", "digits/10", "minilm/3", "a.b-c_d/7"):
        _version(root, rel)
    # none of these is a servable version
    for rel in ("digits/.4", "digits/5.tmp", "digits/latest", "digits/0", "digits/-1",
                "digits/+6", "digits/\u00b2", "digits/\u0663", "digits/ 8"):
        _version(root, rel)
    _version(root, "digits/9", toml=False)                 # no model.toml
    (root / "digits" / "11").write_text("a file, not a directory")
    _version(root, "digits/12", toml=False)
    (root / "digits" / "12" / "model.toml").mkdir()        # a directory named model.toml
    # none of these is a model
    for rel in (".hidden/1", "_tmp/1", "-x/1", "~backup/1", "bad name/1"):
        _version(root, rel)
    (root / "empty").mkdir()
    _version(root, "unversioned/v1")
    (root / "README.md").write_text("not a model")
    return root


def test_scan_finds_exactly_the_servable_versions(repo):
    found = scan(repo)
    assert found == {
        "a.b-c_d": {7: repo / "a.b-c_d" / "7"},
        "digits": {1: repo / "digits" / "1", 2: repo / "digits" / "2",
                   10: repo / "digits" / "10"},
        "minilm": {3: repo / "minilm" / "3"},
    }
    assert list(found) == sorted(found)


def test_scan_of_a_missing_or_non_directory_root_is_empty(tmp_path):
    assert scan(tmp_path / "nope") == {}
    (tmp_path / "file").write_text("x")
    assert scan(tmp_path / "file") == {}
    assert scan(tmp_path) == {}


def test_scan_sees_a_version_once_its_model_toml_exists(tmp_path):
    d = _version(tmp_path, "m/1", toml=False)
    assert scan(tmp_path) == {}
    (d / "model.toml").write_text("")
    assert scan(tmp_path) == {"m": {1: d}}


AVAILABLE = {1: Path("/m/1"), 2: Path("/m/2"), 3: Path("/m/3"), 10: Path("/m/10")}


@pytest.mark.parametrize("policy,want", [
    ("latest:1", [10]),
    ("latest", [10]),
    ("latest:", [10]),
    ("latest:2", [3, 10]),                 # numeric order: 10 is newer than 3
    ("latest:3", [2, 3, 10]),
    ("latest:99", [1, 2, 3, 10]),
    ("all", [1, 2, 3, 10]),
    ("specific:1,3", [1, 3]),
    ("specific: 2 , 10 ", [2, 10]),
    ("specific:3,4", [3]),                 # 4 is not there
    ("specific:5", []),
    ("specific:1,3,", [1, 3]),
])
def test_policies(policy, want):
    chosen = select_versions(AVAILABLE, policy)
    assert sorted(chosen) == want
    assert all(chosen[v] == AVAILABLE[v] for v in chosen)


def test_policy_on_no_versions_selects_nothing():
    for policy in ("latest:1", "all", "specific:1"):
        assert select_versions({}, policy) == {}


def test_selection_is_a_copy():
    chosen = select_versions(AVAILABLE, "all")
    chosen.pop(1)
    assert 1 in AVAILABLE


@pytest.mark.parametrize("policy", [
    "newest", "", "ALL", "all:2", "latest:0", "latest:-1", "latest:x", "latest:1,2",
    "latest:1.5", "specific:", "specific:a", "specific:0", "specific:-1", "specific:1;3",
    "specific:\u00b2", "first:1"])
def test_bad_policy_is_a_config_error(policy):
    with pytest.raises(ConfigError) as err:
        select_versions(AVAILABLE, policy)
    assert err.value.key == "repository.version_policy"
