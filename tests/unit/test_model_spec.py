"""model.toml parsing: every field, the weights hash, and one clear error per bad key."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from daemon.errors import InvalidInput
from daemon.repository_spec import load_spec, weights_sha256
from engines.base import TensorSpec

FULL = """
engine = "onnx"
weights = "model.onnx"
max_batch_size = 8

[[inputs]]
name = "input_ids"
dtype = "int64"
shape = [-1, -1]

[[outputs]]
name = "embeddings"
dtype = "float32"
shape = [-1, 384]

[batching]
max_queue_delay_us = 500
pad_dims = { input_ids = 0 }

[tokenizer]
file = "tokenizer.json"
max_length = 256
"""


def version_dir(tmp_path: Path, toml: str, files: dict[str, bytes] | None = None) -> Path:
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.toml").write_text(toml)
    for name, data in (files or {"model.onnx": b"weights"}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return d


def test_full_spec_is_parsed(tmp_path):
    d = version_dir(tmp_path, FULL, {"model.onnx": b"abc", "tokenizer.json": b"{}"})
    spec = load_spec(d, "m", 1)
    assert (spec.name, spec.version, spec.engine, spec.path) == ("m", 1, "onnx", d)
    assert spec.weights == "model.onnx" and spec.max_batch_size == 8
    assert spec.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert spec.inputs == (TensorSpec("input_ids", "int64", (-1, -1)),)
    assert spec.outputs == (TensorSpec("embeddings", "float32", (-1, 384)),)
    assert set(spec.sections) == {"batching", "tokenizer"}
    assert spec.section("batching")["pad_dims"] == {"input_ids": 0}
    assert spec.section("llm") == {}


def test_onnx_weights_default_to_model_onnx(tmp_path):
    spec = load_spec(version_dir(tmp_path, 'engine = "onnx"\n'), "m", 1)
    assert spec.weights == "model.onnx" and spec.max_batch_size == 0 and spec.inputs == ()


def test_llm_without_weights_lets_the_engine_pick(tmp_path):
    spec = load_spec(version_dir(tmp_path, 'engine = "llm"\n[llm]\nkv_cache_mb = 64\n'), "m", 1)
    assert spec.weights is None and spec.sha256 is None
    assert spec.section("llm") == {"kv_cache_mb": 64}


def test_symlinked_weights_hash_their_target(tmp_path):
    target = tmp_path / "big.gguf"
    target.write_bytes(b"gguf" * 1000)
    d = version_dir(tmp_path, 'engine = "llm"\nweights = "w.gguf"\n', {})
    (d / "w.gguf").symlink_to(target)
    assert load_spec(d, "m", 1).sha256 == hashlib.sha256(b"gguf" * 1000).hexdigest()


def test_directory_weights_hash_names_and_contents(tmp_path):
    d = version_dir(tmp_path, 'engine = "tensorrt"\nweights = "plan"\n',
                    {"plan/a.bin": b"A", "plan/sub/b.bin": b"B"})
    first = load_spec(d, "m", 1).sha256
    expected = hashlib.sha256()
    for name, data in (("a.bin", b"A"), ("sub/b.bin", b"B")):
        expected.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    assert first == expected.hexdigest()
    (d / "plan" / "sub" / "b.bin").write_bytes(b"C")          # a nested file rewritten
    os.utime(d / "plan" / "sub" / "b.bin", ns=(10**18, 10**18))
    second = load_spec(d, "m", 1).sha256
    assert second != first
    os.rename(d / "plan" / "a.bin", d / "plan" / "c.bin")     # same bytes, other name
    assert load_spec(d, "m", 1).sha256 not in (first, second)


def test_rewritten_weights_are_rehashed(tmp_path):
    d = version_dir(tmp_path, 'engine = "onnx"\n', {"model.onnx": b"one"})
    assert weights_sha256(d / "model.onnx") == hashlib.sha256(b"one").hexdigest()
    (d / "model.onnx").write_bytes(b"two")
    os.utime(d / "model.onnx", ns=(10**18, 10**18))
    assert weights_sha256(d / "model.onnx") == hashlib.sha256(b"two").hexdigest()


BAD = [
    ('engine = "onnx"\nmax_batch_size = -1\n', "max_batch_size must be a non-negative integer"),
    ('engine = "onnx"\nmax_batch_size = "4"\n', "max_batch_size must be a non-negative integer"),
    ('engine = "onnx"\nmax_batch_size = true\n', "max_batch_size must be a non-negative integer"),
    ('engine = "pytorch"\n', "engine must be one of"),
    ('weights = "model.onnx"\n', "engine must be one of"),
    ('engine = "onnx"\nweights = "missing.onnx"\n', "weights file 'missing.onnx' not found"),
    ('engine = "onnx"\nweights = "../model.onnx"\n', "weights must be a relative path"),
    ('engine = "onnx"\nweights = "/etc/passwd"\n', "weights must be a relative path"),
    ('engine = "onnx"\nweights = 3\n', "weights must be a file name"),
    ('engine = "onnx"\nmax_batchsize = 4\n', "unknown key 'max_batchsize'"),
    ('engine = "onnx"\ninputs = "x"\n', "inputs must be an array of tables"),
    ('engine = "onnx"\n[[inputs]]\ndtype = "int64"\nshape = [1]\n', "inputs[0].name"),
    ('engine = "onnx"\n[[inputs]]\nname = "x"\ndtype = "float"\nshape = [1]\n',
     "inputs[0].dtype must be one of"),
    ('engine = "onnx"\n[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-2]\n',
     "outputs[0].shape must be a list of integers"),
    ('engine = "onnx"\n[[inputs]]\nname = "x"\ndtype = "int64"\nshape = [1]\n'
     '[[inputs]]\nname = "x"\ndtype = "int64"\nshape = [1]\n',
     "inputs[1].name 'x' is declared twice"),
    ('engine = "onnx"\n[[inputs]]\nname = "x"\ndtype = "int64"\nshape = [1]\ndims = [1]\n',
     "inputs[0] has unknown keys"),
    ('engine = "onnx"\n[[inputs]]\nname = "x"\ndtype = "int64"\nshape = [-1]\n'
     'max_shape = [4, 4]\n', "inputs[0].max_shape must list one bound"),
    ('engine = "onnx"\n[[inputs]]\nname = "x"\ndtype = "int64"\nshape = [-1]\n'
     'max_shape = [0]\n', "inputs[0].max_shape must list one bound"),
    ('engine = "onnx"\n[tokenizer]\nfile = "tok.json"\n', "tokenizer.file 'tok.json' not found"),
    ('engine = "onnx"\n[tokenizer]\nfile = "model.onnx"\nmax_length = 0\n',
     "tokenizer.max_length must be a positive integer"),
    ('engine = "onnx"\nmax_batch_size = \n', "is not valid TOML"),
]


@pytest.mark.parametrize("toml, message", BAD)
def test_bad_config_is_refused_with_a_clear_message(tmp_path, toml, message):
    with pytest.raises(InvalidInput) as err:
        load_spec(version_dir(tmp_path, toml), "m", 1)
    assert err.value.code == "invalid_model_config" and err.value.status == 400
    assert message in err.value.message


def test_missing_model_toml_is_refused(tmp_path):
    with pytest.raises(InvalidInput) as err:
        load_spec(tmp_path, "m", 1)
    assert err.value.code == "invalid_model_config" and "model.toml" in err.value.message
