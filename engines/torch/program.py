"""A PyTorch program as the torch engine runs it: the callable, and its named, typed tensors.

TorchScript (`torch.jit.load`) keeps forward()'s argument names and its return structure but no
dtypes or shapes, so model.toml declares them, and the declaration must fit that signature. An
exported program (`torch.export.load`, run through `.module()`) carries everything: each user
input's dtype and shape (a symbol for a dynamic dim, with its range), each output's too, and a
dict return's keys; model.toml may then narrow what it states, never contradict it.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from daemon.errors import FerryError
from engines.base import ModelSpec, TensorSpec
from engines.tensor_engine import DimNames, load_error, merge_declared
from engines.torch.archive import ArchiveKind, archive_kind, weights_only_loads

__all__ = ["Program", "load_program", "numpy_dtype", "UNBOUNDED"]

UNBOUNDED = -1
# torch.export.load keeps its deserializer in a module global: two loads at once (models load
# on worker threads) fail with "_CURRENT_DESERIALIZER is already set".
_EXPORT_LOCK = threading.Lock()
_NUMPY = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
          "uint16", "uint32", "uint64", "bool")
_UNKNOWN_OP = (re.compile(r"Unknown builtin op: ([\w:.]+)"),
               re.compile(r"failed to resolve (torch\.ops\.[\w.]+) to an operator"),
               re.compile(r"No such operator ([\w:.]+)"))


@dataclass(slots=True)
class Program:
    kind: ArchiveKind
    module: Any                                     # ScriptModule or the program's GraphModule
    inputs: dict[str, TensorSpec]                   # in forward()'s argument order
    outputs: dict[str, TensorSpec]                  # in return order
    dim_names: DimNames = field(default_factory=dict)
    out_dims: DimNames = field(default_factory=dict)
    # input -> per axis (lowest, highest) size the program was exported for; -1: unbounded
    ranges: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    output_keys: tuple[str, ...] | None = None      # a dict return: its keys, by output
    in_spec: Any = None                             # exported: pytree of (args, kwargs)
    memory_bytes: int = 0


def numpy_dtype(dtype: Any, tensor: str) -> str:
    """The numpy dtype name of a torch dtype; `model_load_failed` for bfloat16 and the like."""
    name = str(dtype).removeprefix("torch.")
    if name not in _NUMPY:
        raise load_error(f"tensor {tensor!r} is {name}, which has no KServe/numpy equivalent; "
                         f"the torch engine takes {', '.join(_NUMPY)}")
    return name


def load_program(spec: ModelSpec, path: Path, device: str) -> Program:
    """Load `path` onto `device` and state its tensors, refined and checked by `spec`."""
    import torch

    kind = archive_kind(path)
    with _export_log() as logged:
        try:
            with weights_only_loads():
                if kind is ArchiveKind.TORCHSCRIPT:
                    program = _torchscript(torch, spec, path, device)
                else:
                    program = _exported(torch, spec, path, device)
        except FerryError:
            raise
        except Exception as exc:  # noqa: BLE001 - loaders raise RuntimeError, SerializeError..
            raise _load_failure(path, exc, logged) from None
    program.memory_bytes = _tensor_bytes(program.module.state_dict().values())
    return program


class _ThreadErrors(logging.Filter):
    """Keeps the exceptions torch.export logs on this thread, and keeps them out of the log."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
        return False


@contextlib.contextmanager
def _export_log() -> Iterator[list[BaseException]]:
    """torch.export.load logs the real deserialization error (a missing operator) and raises a
    bare "ran into an error": catch what it logs, so the load error can name the cause."""
    logger = logging.getLogger("torch.export")
    captured = _ThreadErrors()
    logger.addFilter(captured)
    try:
        yield captured.errors
    finally:
        logger.removeFilter(captured)


def _load_failure(path: Path, exc: BaseException, logged: list[BaseException]) -> FerryError:
    chain: list[str] = []
    for raised in (exc, *logged):
        seen: BaseException | None = raised
        while seen is not None and len(chain) < 16:
            chain.append(str(seen))
            seen = seen.__cause__ or seen.__context__
    text = "\n".join(chain)
    for pattern in _UNKNOWN_OP:
        if match := pattern.search(text):
            return load_error(f"{path.name} calls the operator {match.group(1)}, which this "
                              f"PyTorch runtime lacks (a custom op whose library is not "
                              f"loaded, or one from a newer PyTorch)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return load_error(f"cannot load {path.name}: {first[:500]}")


# -- TorchScript ----------------------------------------------------------------------------

def _torchscript(torch: Any, spec: ModelSpec, path: Path, device: str) -> Program:
    module = torch.jit.load(str(path), map_location=device).eval()
    schema = module.forward.schema
    args = schema.arguments[1:]                     # [0] is self
    tensor_args = [a.name for a in args if a.type.kind() == "TensorType"]
    if not spec.inputs or not spec.outputs:
        raise load_error(f"{path.name} is TorchScript, which does not state its tensors' dtypes "
                         "and shapes: declare [[inputs]] (forward()'s tensor arguments: "
                         f"{', '.join(tensor_args) or 'none'}) and [[outputs]] in model.toml")
    declared = {t.name: t for t in spec.inputs}
    for name in declared:
        if name not in tensor_args:
            raise load_error(f"model.toml declares input {name!r}, but forward{_args(args)} "
                             f"takes no tensor argument of that name")
    for arg in args:
        if arg.name not in declared and arg.default_value is None and not _optional(arg):
            raise load_error(f"forward{_args(args)} needs argument {arg.name!r}, which "
                             "model.toml does not declare as an input")
    inputs = {a.name: declared[a.name] for a in args if a.name in declared}
    outputs = {t.name: t for t in spec.outputs}
    returns = schema.returns[0].type if schema.returns else None
    keys = _check_returns(returns, outputs, path)
    return Program(ArchiveKind.TORCHSCRIPT, module, inputs, outputs, output_keys=keys)


def _args(args: list[Any]) -> str:
    return "(" + ", ".join(f"{a.name}: {a.type}" for a in args) + ")"


def _optional(arg: Any) -> bool:
    return arg.type.kind() == "OptionalType"


def _check_returns(returns: Any, outputs: dict[str, TensorSpec],
                   path: Path) -> tuple[str, ...] | None:
    """The declared outputs must fit forward()'s return type; a dict return is read by key."""
    kind = returns.kind() if returns is not None else "NoneType"
    if kind == "TensorType":
        count = 1
    elif kind == "TupleType":
        elements = returns.elements()
        if any(e.kind() != "TensorType" for e in elements):
            raise load_error(f"{path.name}: forward() returns {returns}; the torch engine takes "
                             "a tensor, a tuple of tensors or a Dict[str, Tensor]")
        count = len(elements)
    elif kind == "DictType" and returns.getValueType().kind() == "TensorType":
        return tuple(outputs)
    elif kind == "ListType" and returns.getElementType().kind() == "TensorType":
        return None                                  # its length is checked when it runs
    else:
        raise load_error(f"{path.name}: forward() returns {returns}; the torch engine takes a "
                         "tensor, a tuple of tensors or a Dict[str, Tensor]")
    if count != len(outputs):
        raise load_error(f"model.toml declares {len(outputs)} outputs {sorted(outputs)}, but "
                         f"forward() returns {returns} ({count})")
    return None


# -- torch.export ---------------------------------------------------------------------------

def _exported(torch: Any, spec: ModelSpec, path: Path, device: str) -> Program:
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    with _EXPORT_LOCK:
        ep = torch.export.load(str(path))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass
            ep = move_to_device_pass(ep, device)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    symbols = {str(sym): rng for sym, rng in ep.range_constraints.items()}
    graph_in: dict[str, TensorSpec] = {}
    dim_names: DimNames = {}
    ranges: dict[str, tuple[tuple[int, int], ...]] = {}
    for s in ep.graph_signature.input_specs:
        if s.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(s.arg, TensorArgument):
            raise load_error(f"{path.name}: program input {s.arg} is not a tensor; the torch "
                             "engine passes tensors only")
        val = nodes[s.arg.name].meta.get("val")
        graph_in[s.arg.name], dim_names[s.arg.name], ranges[s.arg.name] = _tensor_of(
            s.arg.name, val, symbols)
    out_vals = _user_outputs(ep, OutputKind)
    names, keys = _output_names(ep.call_spec.out_spec, len(out_vals), spec, path)
    graph_out, out_dims = {}, {}
    for name, val in zip(names, out_vals):
        graph_out[name], out_dims[name], _ = _tensor_of(name, val, symbols)
    in_spec = ep.call_spec.in_spec
    if in_spec is not None and in_spec.num_leaves != len(graph_in):
        raise load_error(f"{path.name}: the program takes {in_spec.num_leaves} values but "
                         f"{len(graph_in)} tensors; the torch engine passes tensors only")
    inputs = merge_declared(graph_in, spec.inputs, "input")
    outputs = merge_declared(graph_out, spec.outputs, "output")
    return Program(ArchiveKind.EXPORTED, ep.module(), inputs, outputs, dim_names, out_dims,
                   ranges, keys, in_spec)


def _tensor_of(name: str, val: Any, symbols: dict[str, Any]
               ) -> tuple[TensorSpec, tuple[str | None, ...], tuple[tuple[int, int], ...]]:
    """A FakeTensor's spec, symbolic dim names and per-axis size ranges."""
    if val is None or not hasattr(val, "dtype") or not hasattr(val, "shape"):
        raise load_error(f"program tensor {name!r} has no recorded dtype and shape "
                         f"(got {type(val).__name__}); re-export it with torch.export")
    shape: list[int] = []
    dims: list[str | None] = []
    bounds: list[tuple[int, int]] = []
    for d in val.shape:
        if isinstance(d, int):
            shape.append(d)
            dims.append(None)
            bounds.append((d, d))
            continue
        expr = str(d.node.expr)
        rng = symbols.get(expr)
        shape.append(-1)
        dims.append(expr if rng is not None else None)
        bounds.append(_bounds(rng))
    return (TensorSpec(name, numpy_dtype(val.dtype, name), tuple(shape)), tuple(dims),
            tuple(bounds))


def _bounds(rng: Any) -> tuple[int, int]:
    if rng is None:
        return 0, UNBOUNDED
    lo, hi = rng.lower, rng.upper
    lo = int(lo) if getattr(lo, "is_finite", True) and lo is not None else 0
    hi = int(hi) if getattr(hi, "is_finite", False) else UNBOUNDED
    return lo, hi


def _user_outputs(ep: Any, output_kind: Any) -> list[Any]:
    output = next(n for n in ep.graph.nodes if n.op == "output")
    values = output.args[0]
    specs = ep.graph_signature.output_specs
    return [v.meta.get("val") if hasattr(v, "meta") else v
            for v, s in zip(values, specs) if s.kind == output_kind.USER_OUTPUT]


def _output_names(out_spec: Any, count: int, spec: ModelSpec,
                  path: Path) -> tuple[list[str], tuple[str, ...] | None]:
    """Output names: a dict return's keys; else model.toml's, by position; else output_N."""
    children = list(out_spec.children()) if hasattr(out_spec, "children") else \
        list(getattr(out_spec, "children_specs", []) or [])
    if out_spec is not None and out_spec.type is dict and all(c.is_leaf() for c in children):
        keys = tuple(str(k) for k in out_spec.context)
        return list(keys), keys
    if spec.outputs:
        if len(spec.outputs) != count:
            raise load_error(f"model.toml declares {len(spec.outputs)} outputs "
                             f"{[t.name for t in spec.outputs]}, but {path.name} returns {count}")
        return [t.name for t in spec.outputs], None
    return (["output"] if count == 1 else [f"output_{i}" for i in range(count)]), None


def _tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if hasattr(t, "untyped_storage"):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
