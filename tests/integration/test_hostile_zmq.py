"""A corpus of hostile messages on a raw DEALER socket against a real daemon's ZMQ frontend.

Whatever a client sends, every message that carries a request gets exactly one `ErrorReply`
with a 4xx status and a stable code (undecodable frames too: their reply has an empty id), a
`Cancel` gets no reply, the ZMQ child keeps its pid, a good infer through `FerryClient` still
works after each probe, and no shared-memory segment outlives the daemon. Every failure of the
corpus is reported at once. Authentication is required, so credential garbage meets the real
key check; every other probe carries a valid key and so reaches the code it aims at.
"""
from __future__ import annotations

import random
import time
import uuid
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import zmq

from daemon import protocol as P
from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import ferry_segments, orphan_segments
from tests.integration.secure_daemon import SecureDaemon

pytestmark = pytest.mark.timeout(180)

REPLY_S = 30.0                       # the longest any probe may take to be answered
PIXELS = np.zeros((1, 64), np.float32).tobytes()      # digits: one [1, 64] float32 image
PROMPT = np.asarray([1, 2, 3], np.int32).tobytes()    # smollm2: three token ids
REGION = "hostile-zmq-region"        # a client region the fixture registers (4 KiB)
Frames = list[bytes]
ID = "@id"                           # replaced by a fresh request id when the probe is sent


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "smollm2")),
                     workers=1, env={"FERRY_TORCH_THREADS": "1"},
                     extra_config="[auth]\nrequired = true\n")
    out = d.cli("tokens", "create", "--name", "hostile", "--scopes", "infer")
    assert out.returncode == 0, out.stderr
    d.key = out.stdout.strip()
    d.start()
    client = FerryClient(d.zmq_endpoint, api_key=d.key, timeout_s=REPLY_S)
    client.register_region(REGION, 4096)
    d.client = client
    yield d
    client.close()
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


# -- the corpus ----------------------------------------------------------------------------------

def _pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _tensor(name: str, dtype: str, shape: Any, loc: Any) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape, "loc": loc}


def _infer(key: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "t": "infer", "id": ID, "model": "digits", "version": 0,
            "inputs": [_tensor("pixels", "float32", [1, 64], {"frame": 0})], "auth": key,
            **fields}


def _generate(key: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "t": "generate", "id": ID, "model": "smollm2", "version": 0,
            "prompt": [_tensor("prompt", "int32", [3], {"frame": 0})],
            "params": {"max_tokens": 1}, "auth": key, **fields}


def _shm(region: str, offset: int = 0, nbytes: int = 256) -> dict[str, Any]:
    return {"region": region, "offset": offset, "nbytes": nbytes}


def _pixels_at(loc: dict[str, Any], shape: Any = (1, 64)) -> list[dict[str, Any]]:
    return [_tensor("pixels", "float32", list(shape), loc)]


def _prompt(dtype: str, shape: Any, loc: Any) -> list[dict[str, Any]]:
    return [_tensor("prompt", dtype, shape, loc)]


def _ids(*ids: int) -> Frames:
    return [np.asarray(ids, np.int32).tobytes()]


def _deep(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"          # [[[...[nil]...]]] in msgpack


class Corpus:
    """Probes as (label, header (a map, given its id when sent) or raw frame, buffers, expect):
    expect "error" (one 4xx ErrorReply), "reply" (one reply; a 4xx if it is an error) or
    "none" (a Cancel: nothing comes back)."""

    def __init__(self, key: str, own_arenas: list[str], region_key: str) -> None:
        self.key, self.own_arenas, self.region_key = key, own_arenas, region_key
        self.rng = random.Random(13)
        self.probes: list[tuple[str, Any, Frames, str]] = []

    def add(self, label: str, header: Any, buffers: Frames = (), expect: str = "error"
            ) -> None:
        self.probes.append((label, header, list(buffers), expect))

    def infer(self, **fields: Any) -> dict[str, Any]:
        return _infer(self.key, **fields)

    def generate(self, **fields: Any) -> dict[str, Any]:
        return _generate(self.key, **fields)


def corpus(key: str, own_arenas: list[str], region_key: str
           ) -> list[tuple[str, Any, Frames, str]]:
    c = Corpus(key, own_arenas, region_key)
    for section in (_frames_that_are_no_message, _versions_and_types, _bad_fields,
                    _bad_tensors, _bad_targets, _bad_shared_memory, _bad_generations,
                    _cancels_and_credentials):
        section(c)
    return c.probes


def _frames_that_are_no_message(c: Corpus) -> None:
    """Frames that are no message."""
    c.add("empty_frame", b"")
    for n in (1, 7, 64, 4096):
        c.add(f"random_bytes_{n}", bytes(c.rng.randrange(256) for _ in range(n)))
    c.add("reserved_byte", b"\xc1\xff not msgpack")
    c.add("truncated_map", _pack(c.infer())[:-9], [PIXELS])
    c.add("trailing_garbage", _pack(c.infer(id="trail")) + b"\x00\x01", [PIXELS])
    for label, value in (("array", [1, 2]), ("string", "infer"), ("nil", None), ("int", 7),
                         ("float_nan", float("nan")), ("bin", b"\x80" * 8)):
        c.add(f"header_{label}", _pack(value))
    c.add("int_keys", b"\x82\x01\x01\x02\xa5infer")          # {1: 1, 2: "infer"}
    c.add("invalid_utf8_str", b"\x82\xa1v\x01\xa1t\xa3\xed\xa0\x80")   # a lone surrogate
    c.add("deep_nesting_100k", _deep(100_000))
    c.add("deep_nesting_in_header", b"\x83\xa1v\x01\xa1t\xa5stats\xa2id" + _deep(1000))
    c.add("header_over_16mb", _pack({"v": 1, "t": "stats", "id": "big", "pad": "x" * (1 << 24)}))
    c.add("map_of_200k_keys", _pack({"v": 1, "t": "stats", "id": "wide",
                                     **{f"k{i}": i for i in range(200_000)}}), expect="reply")


def _versions_and_types(c: Corpus) -> None:
    """Protocol version and message type."""
    for label, v in (("missing", None), ("2", 2), ("0", 0), ("string", "1"), ("bool", True),
                     ("huge", 2**64 - 1), ("negative", -1), ("float", 1.0)):
        h = {"t": "stats", "id": ID} if v is None else {"v": v, "t": "stats", "id": ID}
        c.add(f"version_{label}", h)
    for t in ("nope", "", "INFER", 5, ["infer"], {"t": 1}, None):
        c.add(f"type_{t!r:.12}", {"v": 1, "t": t, "id": ID})
    for t in ("result", "tokens", "free", "error", "region_ok", "load", "unload", "loaded",
              "stats_reply", "hello", "placement", "control", "control_reply"):
        c.add(f"internal_type_{t}", {"v": 1, "t": t, "id": ID, "frees": [], "op": "shutdown",
                                     "name": "digits", "version": 1, "path": "/tmp",
                                     "epoch": 99, "engines": {}, "models": {}, "engine": "x",
                                     "pid": 1, "arena": "x", "ok": True, "stats": {},
                                     "outputs": [], "token_ids": [], "status": 200,
                                     "code": "x", "message": "x"})


def _bad_fields(c: Corpus) -> None:
    """Missing and ill-typed fields."""
    for name in ("id", "model", "version", "inputs"):
        h = c.infer()
        del h[name]
        c.add(f"infer_missing_{name}", h, [PIXELS])
    for name, value in (("id", 5), ("model", 5), ("model", None), ("version", "1"),
                        ("version", 1.5), ("version", True), ("inputs", {}), ("inputs", "x"),
                        ("outputs", "probabilities"), ("outputs", [1]), ("timeout_ms", 1.5),
                        ("timeout_ms", "5"), ("out_shm", []), ("frees", "x"), ("frees", [[1]]),
                        ("request_id", 7), ("auth", 7), ("auth", ["k"])):
        c.add(f"infer_{name}_{type(value).__name__}", c.infer(**{name: value}), [PIXELS])
    c.add("infer_1025_inputs", c.infer(inputs=[_tensor(f"i{i}", "float32", [1], {"frame": 0})
                                           for i in range(1025)]), [PIXELS])
    c.add("infer_no_inputs", c.infer(inputs=[]))


def _bad_tensors(c: Corpus) -> None:
    """Tensor references: dtypes, shapes, frames."""
    for dtype in ("object", "float128", "complex64", "str", "", "<f4"):
        c.add(f"dtype_{dtype or 'empty'}", c.infer(inputs=[_tensor("pixels", dtype, [1, 64],
                                                               {"frame": 0})]), [PIXELS])
    # BYTES tensors: Triton's serialized form (4-byte little-endian length, then the bytes)
    for label, shape, data in (("bytes_garbage", [1, 64], b"\xff" * 7), ("bytes_empty", [0], b""),
                               ("bytes_scalar", [], b"\0\0\0\x05abcde"),
                               ("bytes_length_past_end", [1], b"\xff\xff\xff\x7fab")):
        c.add(f"dtype_{label}", c.infer(inputs=[_tensor("pixels", "bytes", shape,
                                                        {"frame": 0})]), [data])
    c.add("dtype_bytes_shm", c.infer(inputs=[_tensor("pixels", "bytes", [1],
                                                     _shm(REGION, 0, 9))]))
    c.add("dtype_float64", c.infer(inputs=[_tensor("pixels", "float64", [1, 64], {"frame": 0})]),
          [PIXELS * 2])
    c.add("dtype_int8", c.infer(inputs=[_tensor("pixels", "int8", [1, 64], {"frame": 0})]),
          [b"\0" * 64])
    for label, shape in (("negative", [1, -64]), ("2_pow_40", [2**40]), ("float", [1, 64.0]),
                         ("string", "1,64"), ("rank_17", [1] * 17), ("nested", [[1, 64]]),
                         ("bool", [True, 64]), ("uint64_max", [2**64 - 1])):
        c.add(f"shape_{label}", c.infer(inputs=[_tensor("pixels", "float32", shape,
                                                    {"frame": 0})]), [PIXELS])
    c.add("shape_huge_product", c.infer(inputs=[_tensor("pixels", "float32",
                                                        [2**39, 2**39, 2**39], {"frame": 0})]),
          [PIXELS])
    c.add("shape_product_wraps_int64", c.infer(inputs=[_tensor("pixels", "float32",
                                                               [2**32, 2**32], {"frame": 0})]),
          [b""])
    c.add("shape_rank_16_overflow", c.infer(inputs=[_tensor("pixels", "float32", [2**39] * 16,
                                                        {"frame": 0})]), [PIXELS])
    c.add("shape_zero_rows", c.infer(inputs=[_tensor("pixels", "float32", [0, 64], {"frame": 0})]),
          [b""], "reply")
    c.add("shape_scalar", c.infer(inputs=[_tensor("pixels", "float32", [], {"frame": 0})]),
          [b"\0" * 4])
    c.add("shape_wrong_width", c.infer(inputs=[_tensor("pixels", "float32", [1, 65],
                                                   {"frame": 0})]), [b"\0" * 260])
    c.add("shape_rank_3", c.infer(inputs=[_tensor("pixels", "float32", [1, 1, 64], {"frame": 0})]),
          [PIXELS])
    c.add("frame_short", c.infer(), [PIXELS[:10]])
    c.add("frame_long", c.infer(), [PIXELS + b"\0"])
    c.add("frame_64mb", c.infer(), [b"\0" * (64 << 20)])
    c.add("frame_missing", c.infer())
    for label, idx in (("index_past_end", 3), ("index_negative", -1), ("index_bool", True),
                       ("index_string", "0"), ("index_uint64", 2**64 - 1)):
        c.add(f"frame_{label}", c.infer(inputs=_pixels_at({"frame": idx})), [PIXELS])
    c.add("fewer_buffers_than_refs", c.infer(inputs=[
        _tensor("pixels", "float32", [1, 64], {"frame": 0}),
        _tensor("extra", "float32", [1, 64], {"frame": 1})]), [PIXELS])
    c.add("more_buffers_than_refs", c.infer(), [PIXELS, PIXELS, b"junk"], "reply")
    c.add("same_input_twice", c.infer(inputs=[_tensor("pixels", "float32", [1, 64], {"frame": 0}),
                                          _tensor("pixels", "float32", [1, 64],
                                                  {"frame": 0})]), [PIXELS], "reply")
    c.add("unknown_input", c.infer(inputs=[_tensor("nope", "float32", [1, 64], {"frame": 0})]),
          [PIXELS])
    c.add("tensor_not_map", c.infer(inputs=[[1, 2, 3]]), [PIXELS])
    c.add("tensor_name_long", c.infer(inputs=[_tensor("p" * 300, "float32", [1, 64],
                                                  {"frame": 0})]), [PIXELS])
    c.add("loc_empty", c.infer(inputs=_pixels_at({})), [PIXELS])
    c.add("loc_not_map", c.infer(inputs=_pixels_at([0])), [PIXELS])


def _bad_targets(c: Corpus) -> None:
    """Models, versions, outputs, timeouts."""
    for label, model, version in (("unknown_model", "nope", 0), ("empty_model", "", 0),
                                  ("unknown_version", "digits", 99),
                                  ("negative_version", "digits", -1),
                                  ("uint64_version", "digits", 2**64 - 1),
                                  ("traversal_model", "../../etc/passwd", 0),
                                  ("sha_like_model", "0" * 64, 0)):
        c.add(label, c.infer(model=model, version=version), [PIXELS])
    c.add("unknown_output", c.infer(outputs=["nope"]), [PIXELS])
    c.add("output_twice", c.infer(outputs=["probabilities"] * 2), [PIXELS], "reply")
    c.add("outputs_empty", c.infer(outputs=[]), [PIXELS], "reply")
    c.add("out_shm_unrequested", c.infer(outputs=["probabilities"], out_shm={
        "nope": [REGION, 0, 40]}), [PIXELS], "reply")
    c.add("infer_on_llm", c.infer(model="smollm2"), [PIXELS])
    c.add("dtype_float16", c.infer(inputs=[_tensor("pixels", "float16", [1, 64],
                                                   {"frame": 0})]), [PIXELS[:128]])
    c.add("timeout_negative", c.infer(timeout_ms=-5), [PIXELS])
    c.add("timeout_uint64_max", c.infer(timeout_ms=2**64 - 1), [PIXELS])     # was a 500
    c.add("timeout_int64_min", c.infer(timeout_ms=-2**63), [PIXELS])         # was a 504
    c.add("request_id_1mb", c.infer(request_id="r" * (1 << 20)), [PIXELS], "reply")
    c.add("request_id_control_chars", c.infer(request_id="a\nb\r\x00\x1b[31m"), [PIXELS], "reply")
    c.add("id_1mb", c.infer(id="i" * (1 << 20)), [PIXELS], "reply")


def _bad_shared_memory(c: Corpus) -> None:
    """Shared memory: unregistered regions, Ferry's own arenas, bounds."""
    for label, region in (("unregistered", "never-registered"), ("traversal", "../../etc/passwd"),
                          ("nul", "a\x00b"), ("long", "r" * 250), ("empty", "")):
        c.add(f"shm_{label}", c.infer(inputs=_pixels_at(_shm(region))))
    for arena in c.own_arenas:
        role = arena.split("-")[-2]
        c.add(f"shm_own_arena_{role}", c.infer(inputs=_pixels_at(_shm(arena))))
        c.add(f"out_shm_own_arena_{role}", c.infer(out_shm={"probabilities": [arena, 0, 40]}),
              [PIXELS])
        c.add(f"frees_own_arena_{role}", c.infer(frees=[[arena, 0, 64]]), [PIXELS], "reply")
        c.add(f"register_own_arena_{role}", {"v": 1, "t": "register_region", "id": ID,
                                            "name": "sneaky", "key": arena, "offset": 0,
                                            "nbytes": 64})
    for label, loc in (("offset_past_end", _shm(REGION, 4096)),
                       ("offset_straddles_end", _shm(REGION, 4096 - 64)),
                       ("offset_uint64_max", _shm(REGION, 2**64 - 1)),
                       ("offset_negative", _shm(REGION, -64)),
                       ("nbytes_mismatch", _shm(REGION, 0, 255)),
                       ("nbytes_negative", _shm(REGION, 0, -256)),
                       ("nbytes_string", _shm(REGION, 0, "256")),
                       ("region_int", {"region": 5, "offset": 0, "nbytes": 256})):
        c.add(f"shm_{label}", c.infer(inputs=_pixels_at(loc)))
    c.add("shm_huge_shape", c.infer(inputs=_pixels_at(_shm(REGION, 0, 4 * 2**60),
                                                      (2**30, 2**30))))
    for label, loc in (("past_end", [REGION, 4096, 40]), ("uint64", [REGION, 2**64 - 1, 40]),
                       ("too_small", [REGION, 0, 8]), ("unregistered", ["never", 0, 40]),
                       ("not_list", "x"), ("short_list", [REGION, 0])):
        c.add(f"out_shm_{label}", c.infer(out_shm={"probabilities": loc}), [PIXELS])
    for label, fields in (("missing_segment", {"key": "/fyc-no-such-segment"}),
                          ("traversal_key", {"key": "../../etc/passwd"}),
                          ("dev_shm_dir", {"key": "/"}),
                          ("nul_key", {"key": "a\x00b"}),
                          ("negative_offset", {"key": c.region_key, "offset": -1}),
                          ("zero_nbytes", {"key": c.region_key, "nbytes": 0}),
                          ("window_past_end", {"key": c.region_key, "offset": 4096}),
                          ("own_prefix_name", {"name": c.own_arenas[0]}),
                          ("existing_name", {"name": REGION}),
                          ("name_slash", {"name": "a/b"}),
                          ("nbytes_uint64", {"key": c.region_key, "nbytes": 2**64 - 1}),
                          ("offset_uint64", {"key": c.region_key, "offset": 2**64 - 1}),
                          ("key_int", {"key": 5})):
        c.add(f"register_{label}", {"v": 1, "t": "register_region", "id": ID, "name": "hostile",
                                    "key": "/fyc-no-such", "offset": 0, "nbytes": 64, **fields})
    c.add("unregister_unknown", {"v": 1, "t": "unregister_region", "id": ID, "name": "nope"})
    # an empty name once meant "every region", other clients' included
    c.add("unregister_empty_name", {"v": 1, "t": "unregister_region", "id": ID, "name": ""})


def _bad_generations(c: Corpus) -> None:
    """Generate with bad prompts and parameters."""
    c.add("generate_prompt_out_of_int32",                                  # was a 500
          c.generate(prompt=[_tensor("prompt", "int64", [2], {"frame": 0})]),
          [np.asarray([2**40, 1], np.int64).tobytes()])
    c.add("generate_prompt_out_of_vocab", c.generate(), _ids(1, 2, 2**30))
    c.add("generate_prompt_negative", c.generate(), _ids(1, -2, 3))
    c.add("generate_prompt_empty", c.generate(prompt=_prompt("int32", [0], {"frame": 0})), [b""])
    c.add("generate_prompt_float", c.generate(prompt=_prompt("float32", [3], {"frame": 0})),
          [PROMPT])
    c.add("generate_prompt_shm", c.generate(prompt=_prompt("int32", [3], _shm(REGION, 0, 12))))
    c.add("generate_two_prompts", c.generate(prompt=_prompt("int32", [3], {"frame": 0}) * 2),
          [PROMPT])
    c.add("generate_prompt_frame_short", c.generate(), [PROMPT[:5]])
    for label, params in (("max_tokens_negative", {"max_tokens": -1}),
                          ("max_tokens_zero", {"max_tokens": 0}),
                          ("max_tokens_string", {"max_tokens": "9"}),
                          ("max_tokens_uint64", {"max_tokens": 2**64 - 1}),
                          ("max_tokens_float", {"max_tokens": 1.5}),
                          ("temperature_nan", {"max_tokens": 1, "temperature": float("nan")}),
                          ("temperature_inf", {"max_tokens": 1, "temperature": float("inf")}),
                          ("top_p_big", {"max_tokens": 1, "top_p": 7}),
                          ("top_k_string", {"max_tokens": 1, "top_k": "x"}),
                          ("seed_uint64", {"max_tokens": 1, "seed": 2**64 - 1}),
                          ("stop_ids_negative", {"max_tokens": 1, "stop_token_ids": [-5]}),
                          ("stop_ids_nested", {"max_tokens": 1, "stop_token_ids": [[1]]}),
                          ("unknown_param", {"max_tokens": 1, "frobnicate": True}),
                          ("bytes_key", {b"max_tokens": 1}),
                          ("ext_value", {"max_tokens": msgpack.ExtType(5, b"xx")})):
        c.add(f"generate_{label}", c.generate(params=params), [PROMPT])
    c.add("generate_params_list", c.generate(params=[1]), [PROMPT])
    # as deep as the unpacker allows (1024 levels), forwarded to the engine as it came
    deep = _pack(c.generate(params={"max_tokens": 1, "x": "D" * 15}))
    c.add("generate_params_1024_deep", deep.replace(b"\xaf" + b"D" * 15, _deep(1022)), [PROMPT])
    c.add("infer_outputs_15mb", c.infer(outputs=["o" * 1000] * 15000), [PIXELS])
    c.add("generate_tensor_model", c.generate(model="digits"), [PROMPT])
    c.add("generate_unknown_model", c.generate(model="nope"), [PROMPT])


def _cancels_and_credentials(c: Corpus) -> None:
    """Cancel (no reply, ever) and credentials."""
    c.add("cancel_unknown_id", {"v": 1, "t": "cancel", "id": "ghost"}, expect="none")
    c.add("cancel_empty_id", {"v": 1, "t": "cancel", "id": ""}, expect="none")
    c.add("cancel_1mb_id", {"v": 1, "t": "cancel", "id": "g" * (1 << 20)}, expect="none")
    c.add("cancel_id_int", {"v": 1, "t": "cancel", "id": 5})
    for label, auth in (("missing", ""), ("garbage", "not-a-key"),
                        ("bearer_prefix", f"Bearer {c.key}"), ("key_truncated", c.key[:-1]),
                        ("key_plus_nul", c.key + "\x00"),
                        ("jwt_shaped", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
                        ("jwt_bad_b64", "eyJ!!!.eyJ???.sig"), ("one_mb", "k" * (1 << 20)),
                        ("unicode", "ключ-🔑"), ("spaces", "   ")):
        c.add(f"auth_{label}", c.infer(auth=auth), [PIXELS])
        c.add(f"auth_{label}_generate", c.generate(auth=auth), [PROMPT])
    bad_utf8 = _pack(c.infer(auth="A" * 15)).replace(b"A" * 15, b"\xed\xa0\x80" * 5)
    c.add("auth_invalid_utf8", bad_utf8, [PIXELS])


# -- running it ---------------------------------------------------------------------------------

def _own_arenas(d: SecureDaemon) -> list[str]:
    """Ferry's internal segments of this daemon (engine, HTTP worker, ZMQ frontend arenas)."""
    pids = {str(p) for p in d.child_pids("")}
    return sorted(n for n in ferry_segments() if n.rsplit("-", 1)[-1] in pids)


def _frames(header: Any, msg_id: str) -> bytes:
    if isinstance(header, bytes):
        return header
    if isinstance(header, dict) and header.get("id") == ID:
        header = {**header, "id": msg_id}
    return _pack(header)


def _replies(sock: zmq.Socket, until: Callable[[P.Message], bool], timeout_s: float
             ) -> tuple[list[P.Message], bool]:
    """Replies read until one satisfies `until` (True) or the deadline passes (False)."""
    got: list[P.Message] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        msg, _ = P.decode(sock.recv_multipart(copy=False))
        got.append(msg)
        if until(msg):
            return got, True
    return got, False


def _judge(label: str, expect: str, sent: bytes, wanted: set[str] | None,
           replies: list[P.Message], done: bool, own: list[str]) -> list[str]:
    if expect == "none":
        return [f"{label}: a Cancel was answered: {r}"[:200] for r in replies[:-1]]
    if not done:
        return [f"{label}: no reply in {REPLY_S:g} s"]
    reply = replies[-1]
    out = [f"{label}: a stray reply before the answer: {str(r)[:120]}" for r in replies[:-1]]
    if isinstance(reply, P.ErrorReply):
        if reply.status >= 500 or not (400 <= reply.status < 500):
            out.append(f"{label}: {reply.status} {reply.code}: {reply.message[:160]}")
        elif not reply.code or reply.code == "internal_error":
            out.append(f"{label}: {reply.status} without a stable code")
        elif wanted is not None and reply.id not in wanted:
            out.append(f"{label}: the error answers id {reply.id[:40]!r}")
        elif any(n in reply.message and n.encode() not in sent for n in own):
            out.append(f"{label}: the error names an internal region: {reply.message[:160]}")
    elif expect == "error":
        out.append(f"{label}: accepted, not refused: {str(reply)[:160]}")
    return out


def _healthy(d: SecureDaemon, zmq_pid: int) -> str | None:
    if d.child_pids("zmq") != [zmq_pid]:
        return f"the ZMQ frontend was replaced: {d.child_pids('zmq')} (was {zmq_pid})"
    try:
        out = d.client.infer("digits", {"pixels": np.zeros((1, 64), np.float32)})
    except Exception as exc:          # any failure of the good request is the finding
        return f"a good infer failed afterwards: {exc!r}"[:200]
    return None if out["probabilities"].shape == (1, 10) else "a good infer answered wrongly"


def test_no_hostile_zmq_message_gets_a_5xx_or_hurts_the_daemon(ferry):
    (zmq_pid,) = ferry.child_pids("zmq")
    own = _own_arenas(ferry)
    assert any("-zmq-" in n for n in own) and any("-eng" in n for n in own), own
    probes = corpus(ferry.key, own, ferry.client.region.key)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ferry.zmq_endpoint)
    failures: list[str] = []
    started = time.monotonic()
    try:
        for n, (label, header, buffers, expect) in enumerate(probes):
            msg_id = f"h{n}-{uuid.uuid4().hex[:8]}"
            sent = _frames(header, msg_id)
            sock.send_multipart([sent, *buffers], copy=False)
            if expect == "none":   # a fence: its reply comes after anything the Cancel caused
                fence = f"fence-{msg_id}"
                sock.send_multipart([_pack({"v": 1, "t": "stats", "id": fence})])
                replies, done = _replies(sock, lambda m: getattr(m, "id", "") == fence,
                                         REPLY_S)
                if not done:
                    failures.append(f"{label}: the fence after it was not answered")
                failures += _judge(label, expect, sent, None, replies, done, own)
            else:
                wanted = {msg_id, ""} if isinstance(header, dict) and \
                    header.get("id") == ID else None
                replies, done = _replies(
                    sock, lambda m: wanted is None or getattr(m, "id", None) in wanted, REPLY_S)
                if replies and isinstance(replies[-1], P.Tokens) and not replies[-1].finished:
                    # a generation that ran: read it to its end, so its tokens cannot pass
                    # for the next probe's reply
                    _replies(sock, lambda m: isinstance(m, P.Tokens) and m.finished, REPLY_S)
                failures += _judge(label, expect, sent, wanted, replies, done, own)
            if (problem := _healthy(ferry, zmq_pid)) is not None:
                failures.append(f"{label}: {problem}")
                if "replaced" in problem:
                    zmq_pid = ferry.child_pids("zmq")[0] if ferry.child_pids("zmq") else zmq_pid
    finally:
        sock.close(0)
    print(f"\n{len(probes)} hostile ZMQ probes in {time.monotonic() - started:.1f} s, "
          f"{len(failures)} failures")
    assert len(probes) >= 40
    assert not failures, f"{len(failures)} of {len(probes)} probes:\n" + "\n".join(failures)
    assert "unhandled error" not in ferry.log() and "zmq request failed" not in ferry.log()


def test_named_probes_get_their_codes(ferry):
    """The stable codes a client can rely on for the commonest mistakes."""
    key = ferry.key
    own = next(n for n in _own_arenas(ferry) if "-eng" in n)
    expect = [
        (b"\xc1\xff", [], "bad_message"),
        (_pack({"v": 2, "t": "stats", "id": "x"}), [], "protocol_version"),
        (_pack({"v": 1, "t": "nope", "id": "x"}), [], "bad_message"),
        (_pack(_infer(key, id="x")), [PIXELS[:8]], "invalid_shape"),
        (_pack(_infer(key, id="x", model="nope")), [PIXELS], "model_not_found"),
        (_pack(_infer(key, id="x", inputs=_pixels_at(_shm(own)))), [], "shm_unknown_region"),
        (_pack(_infer(key, id="x", inputs=_pixels_at(_shm(REGION, 4096 - 64)))), [],
         "shm_out_of_bounds"),
        (_pack(_infer("", id="x")), [PIXELS], "missing_credentials"),
        (_pack({"v": 1, "t": "unregister_region", "id": "x", "name": ""}), [],
         "shm_bad_region"),
        # the fixture's region survived the corpus's empty-name unregister
        (_pack(_infer(key, id="x", inputs=_pixels_at(_shm(REGION, 4096 - 64)))), [],
         "shm_out_of_bounds"),
    ]
    got = []
    with zmq.Context.instance().socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ferry.zmq_endpoint)
        for header, buffers, _ in expect:
            sock.send_multipart([header, *buffers])
            replies, done = _replies(sock, lambda m: True, REPLY_S)
            got.append(replies[-1].code if done and isinstance(replies[-1], P.ErrorReply)
                       else replies)
    assert got == [code for *_, code in expect]

