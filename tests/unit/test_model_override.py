"""Triton's load-time config override mapped onto a model.toml, and the rewritten copy."""
from __future__ import annotations

import tomllib

import pytest

from daemon.errors import InvalidInput
from daemon.model_override import materialize, parse_config, write_upload


@pytest.mark.parametrize("raw, want", [
    ('{"max_batch_size": "16"}', {"max_batch_size": 16}),      # protobuf JSON: int64 as text
    ('{"max_batch_size": 4, "name": "simple"}', {"max_batch_size": 4}),
    ("{}", {}),
])
def test_config_maps_to_model_toml_keys(raw, want):
    assert parse_config("simple", raw) == want


@pytest.mark.parametrize("raw", [
    '"parameters": {"config": {{"max_batch_size": "16"}}}', "[]", "3", {"max_batch_size": 1},
    '{"max_batch_size": true}', '{"max_batch_size": 2147483648}', '{"max_batch_size": "1e3"}',
    '{"name": "other"}', '{"instance_group": []}',
])
def test_bad_config_is_refused_as_failed_to_load(raw):
    with pytest.raises(InvalidInput) as err:
        parse_config("simple", raw)
    assert err.value.code == "invalid_model_config" and "failed to load 'simple'" in err.value.message


def test_materialize_rewrites_only_the_overridden_top_level_key(tmp_path):
    src = tmp_path / "repo" / "m" / "1"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"weights")
    (src / "model.toml").write_text('engine = "onnx"\nmax_batch_size = 8\n\n[batching]\n'
                                    'max_batch_size_hint = 3\n')
    out = materialize(src, tmp_path / "state" / "m" / "1", {"max_batch_size": 2})
    spec = tomllib.loads((out / "model.toml").read_text())
    assert spec["max_batch_size"] == 2 and spec["engine"] == "onnx"
    assert spec["batching"] == {"max_batch_size_hint": 3}
    assert (out / "model.onnx").is_symlink() and (out / "model.onnx").read_bytes() == b"weights"
    assert "max_batch_size = 8" in (src / "model.toml").read_text()     # the repository untouched
    again = materialize(src, out, {"max_batch_size": 5})                  # replaces the copy
    assert tomllib.loads((again / "model.toml").read_text())["max_batch_size"] == 5


def test_uploaded_files_become_a_one_model_repository(tmp_path):
    from daemon.model_override import parse_files, write_upload
    from daemon.repository import scan
    files = parse_files("up", {"config": "{}", "file:1/model.onnx": "d2VpZ2h0cw==",
                               "file:2/sub/extra.bin": ""})
    assert files == {"1/model.onnx": b"weights", "2/sub/extra.bin": b""}
    root = write_upload(tmp_path, "up", {"max_batch_size": 2}, files)
    found = scan(root)
    assert sorted(found["up"]) == [1, 2]
    spec = tomllib.loads((found["up"][1] / "model.toml").read_text())
    assert spec == {"engine": "onnx", "max_batch_size": 2}


@pytest.mark.parametrize("key", ["file:../x", "file:1/../x", "file:1/./x", "file:/abs", "file:x",
                                 "file:0/x", "file:1/", "file:1//x", "file:1/a b"])
def test_upload_paths_stay_inside_a_version_directory(key):
    from daemon.model_override import parse_files
    with pytest.raises(InvalidInput) as err:
        parse_files("up", {key: ""})
    assert err.value.code == "invalid_model_config"


@pytest.mark.parametrize("model", ["..", ".", ".hidden", "a/b", "", "x" * 200])
def test_an_upload_never_writes_outside_its_own_model_directory(tmp_path, model):
    base = tmp_path / "uploads"
    keep = tmp_path / "keep"
    keep.mkdir()
    with pytest.raises(InvalidInput) as err:
        write_upload(base, model, {}, {"1/model.onnx": b"x"})
    assert err.value.code == "invalid_model_config"
    assert keep.is_dir() and not base.exists()


def test_a_path_that_is_both_a_file_and_a_directory_is_refused():
    from daemon.model_override import parse_files
    with pytest.raises(InvalidInput) as err:
        parse_files("m", {"file:1/a": "eA==", "file:1/a/b": "eA=="})
    assert err.value.code == "invalid_model_config" and "file:1/a " in err.value.message
    assert set(parse_files("m", {"file:1/a/b": "eA==", "file:1/a/c": "eA=="})) == \
        {"1/a/b", "1/a/c"}
