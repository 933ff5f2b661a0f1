"""TensorEngine, the part ONNX Runtime and TensorRT share, with a numpy "runtime" standing in
for the GPU one: the hooks TensorRT relies on (per-input limits, errors raised while running)
behave as OnnxEngine's tests expect of the whole."""
from __future__ import annotations


import numpy as np
import pytest

from daemon.errors import InvalidInput
from daemon.repository_spec import load_spec
from engines.base import ModelInfo, ModelSpec, TensorRequest, TensorSpec
from engines.tensor_engine import TensorEngine
from tests.engine_steps import drain


class NumpyEngine(TensorEngine):
    """y = 2x [batch, n]; rows holding a negative number fail while running; n <= 8."""

    engine_name = "numpy"

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.shapes: list[tuple[int, ...]] = []

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        x, y = TensorSpec("x", "float32", (-1, -1)), TensorSpec("y", "float32", (-1, -1))
        self._configure(spec, {"x": x}, {"y": y}, {"x": ("batch", "n")}, {"y": ("batch", "n")})
        self.ready = True
        self._warm_up()
        return ModelInfo(spec.name, spec.version, "numpy", "tensor", [x], [y], self._max_batch)

    def unload(self) -> None:
        self.ready = False
        self._reset_queue()

    def _loaded(self) -> bool:
        return self.ready

    def _check_input(self, name: str, arr: np.ndarray) -> None:
        if arr.shape[1] > 8:
            raise InvalidInput("n must be at most 8", code="invalid_shape", param=name)

    def _warmup_shape(self, spec: TensorSpec) -> list[int]:
        return [4, 8]

    def _execute(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.shapes.append(feeds["x"].shape)
        if (feeds["x"] < 0).any():
            raise InvalidInput("negative input", code="invalid_input")
        return [feeds["x"] * 2]


@pytest.fixture
def engine(tmp_path) -> NumpyEngine:
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"unused")
    (d / "model.toml").write_text('engine = "onnx"\nmax_batch_size = 8\n'
                                  '[batching]\npad_dims = { x = 0 }\n')
    e = NumpyEngine()
    e.load(load_spec(d, "m", 1), "cpu")
    return e



def test_warm_up_runs_at_the_runtime_chosen_shape(engine):
    assert engine.shapes == [(4, 8)]


def test_runtime_limits_are_checked_at_submit(engine):
    with pytest.raises(InvalidInput) as err:
        engine.submit(TensorRequest("a", {"x": np.ones((1, 9), np.float32)}))
    assert (err.value.code, err.value.param) == ("invalid_shape", "x")
    assert not engine.has_work()


def test_an_error_raised_while_running_reaches_only_its_request(engine):
    engine.submit(TensorRequest("good", {"x": np.ones((1, 3), np.float32)}))
    engine.submit(TensorRequest("bad", {"x": -np.ones((2, 5), np.float32)}))
    out = drain(engine)
    assert engine.shapes[1:] == [(3, 5), (1, 3), (2, 5)]      # padded batch, then one by one
    np.testing.assert_array_equal(out["good"].outputs["y"], [[2, 2, 2]])   # cut back to n=3
    assert out["bad"].outputs is None and out["bad"].error.code == "invalid_input"
    assert engine.stats()["failed"] == 1 and engine.stats()["batch_sizes"] == {"1": 1}


def test_other_requests_are_refused_with_the_engine_name(engine):
    with pytest.raises(InvalidInput) as err:
        engine.submit(object())                              # type: ignore[arg-type]
    assert "the numpy engine serves tensor requests only" in err.value.message
