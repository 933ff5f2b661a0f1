"""The loader's sliced dequantizer (engines/llm/gguf_loader._dequantize) gives bit for bit what
gguf's own `quants.dequantize` gives, for every block type the tests can write, across slice
boundaries that cut a tensor in odd places; a type gguf cannot decode is a load error."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from engines.llm.config import ModelLoadFailed
from engines.llm import gguf_loader
from tests.unit.gguf_blocks import quantize

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402


@dataclass
class _File:
    data: np.ndarray
    path: str = "test.gguf"

    def raw(self, tensor: gguf_loader.GGUFTensor) -> np.ndarray:
        return self.data


def _tensor(qtype: GGMLQuantizationType, raw: np.ndarray, cols: int) -> gguf_loader.GGUFTensor:
    return gguf_loader.GGUFTensor("blk.0.ffn_up.weight", (cols, raw.shape[0]), int(qtype), 0,
                                  raw.nbytes)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                  "Q4_K", "IQ4_NL"])
@pytest.mark.parametrize("slice_values", [512 * 7, 1 << 22])
def test_same_bits_as_gguf(name, slice_values, monkeypatch):
    w = np.random.default_rng(0).standard_normal((300, 512)).astype(np.float32)
    raw = np.ascontiguousarray(quantize(w, name)).view(np.uint8).reshape(300, -1)
    qtype = GGMLQuantizationType[name]
    expected = np.ascontiguousarray(quants.dequantize(raw, qtype)).reshape(300, 512)
    monkeypatch.setattr(gguf_loader, "_DEQUANT_SLICE", slice_values)
    got = gguf_loader._dequantize(_File(raw), _tensor(qtype, raw, 512))
    assert got.shape == (300, 512) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_a_type_gguf_cannot_decode_is_a_load_error():
    raw = np.zeros((4, 36), np.uint8)
    qtype = GGMLQuantizationType.Q8_1
    with pytest.raises(ModelLoadFailed, match="Q8_1, which cannot be dequantized"):
        gguf_loader._dequantize(_File(raw), _tensor(qtype, raw, 32))
