"""Running an ONNX Runtime session on a CUDA device with IO binding.

`InferenceSession.run()` with numpy feeds copies each input to the device and each output back
on every call, and lets ONNX Runtime pick where outputs land (for the CUDA EP: device memory
that is then copied again into fresh numpy arrays). With IO binding the inputs are placed on the
device once, as `OrtValue`s, the outputs are bound to the device so the graph writes them there
directly, and each output is copied to the host exactly once after the run. The module
imports on CPU-only hosts (OnnxEngine only uses it for `cuda:N` devices).
"""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

__all__ = ["CudaIOBinding"]

log = logging.getLogger(__name__)


class CudaIOBinding:
    """Runs `session` with inputs and outputs in the memory of CUDA device `device_id`."""

    def __init__(self, session: ort.InferenceSession, device_id: int) -> None:
        self._session = session
        self.device_id = device_id
        self.runs = 0                   # successful runs (tests and stats check the path is used)

    def run(self, names: list[str], feeds: dict[str, np.ndarray],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """Outputs `names`, in that order, as host arrays (one device-to-host copy each)."""
        binding = self._session.io_binding()
        # The OrtValues must outlive run_with_iobinding: the binding holds raw device pointers.
        values = []
        for name, arr in feeds.items():
            # One host-to-device copy; ORT needs C-contiguous memory (a padded batch already is,
            # a sliced shared-memory view may not be).
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda",
                                                     self.device_id)
            binding.bind_ortvalue_input(name, value)
            values.append(value)
        for name in names:
            # No shape: ORT allocates each output on the device at the size the run produces.
            binding.bind_output(name, "cuda", self.device_id)
        self._session.run_with_iobinding(binding, run_options)
        outputs = binding.copy_outputs_to_cpu()
        self.runs += 1
        return outputs
