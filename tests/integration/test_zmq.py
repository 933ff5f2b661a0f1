"""The binary ZeroMQ frontend and the Python client, against a real daemon."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from daemon import protocol as P
from daemon.errors import FerryError
from frontends.client import AsyncFerryClient, FerryClient


@pytest.fixture()
def client(daemon):
    c = FerryClient(daemon.zmq_endpoint, timeout_s=30)
    yield c
    c.close()


def _digits(n: int, seed: int = 0) -> np.ndarray:
    from daemon.demo import digits_split
    _, x_test, _, _ = digits_split()
    return x_test[seed:seed + n].astype(np.float32)


def test_inline_and_shared_memory_give_the_same_result(client):
    x = _digits(8)
    inline = client.infer("digits", {"pixels": x})["probabilities"]
    client.register_region("zmq-test-region", 1 << 20)
    via_shm = client.infer("digits", {"pixels": x}, use_shm=True)["probabilities"]
    np.testing.assert_array_equal(inline, via_shm)
    assert inline.shape == (8, 10)
    # outputs straight into the client's region as well
    loc = client.region.reserve(8 * 10 * 4)
    into = client.infer("digits", {"pixels": x}, use_shm=True,
                        out_shm={"probabilities": loc})["probabilities"]
    np.testing.assert_array_equal(inline, into)


def test_classifies_held_out_digits(client):
    from daemon.demo import digits_split
    _, x_test, _, y_test = digits_split()
    x = x_test.astype(np.float32)
    probs = np.concatenate([client.infer("digits", {"pixels": x[i:i + 64]})["probabilities"]
                            for i in range(0, len(x), 64)])
    assert (probs.argmax(1) == y_test).mean() > 0.95


def test_concurrent_clients_are_batched_and_answered_individually(daemon):
    x = _digits(64)
    expected = FerryClient(daemon.zmq_endpoint).infer("digits", {"pixels": x})["probabilities"]
    before = FerryClient(daemon.zmq_endpoint).stats()

    async def run() -> list[np.ndarray]:
        clients = [AsyncFerryClient(daemon.zmq_endpoint) for _ in range(4)]
        try:
            jobs = [clients[i % 4].infer("digits", {"pixels": x[i:i + 1]}) for i in range(64)]
            return [r["probabilities"] for r in await asyncio.gather(*jobs)]
        finally:
            for c in clients:
                await c.close()
    results = asyncio.run(run())
    for i, r in enumerate(results):
        np.testing.assert_allclose(r[0], expected[i], rtol=1e-5, atol=1e-6)
    after = FerryClient(daemon.zmq_endpoint).stats()

    def batches(stats: dict) -> dict[int, int]:
        sizes = stats["engines"][0]["models"]["digits:1"]["batch_sizes"]
        return {int(k): v for k, v in sizes.items()}
    new = {k: v - batches(before).get(k, 0) for k, v in batches(after).items()}
    assert any(size > 1 and count > 0 for size, count in new.items()), new


def test_sync_clients_from_threads(daemon):
    x = _digits(16)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with FerryClient(daemon.zmq_endpoint) as c:
                for _ in range(5):
                    out = c.infer("digits", {"pixels": x[i:i + 1]})["probabilities"]
                    assert out.shape == (1, 10)
        except BaseException as exc:   # collected and re-raised in the test thread
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


@pytest.mark.parametrize("mutate,code", [
    (lambda x: {"pixels": x.astype(np.float64)}, "invalid_dtype"),
    (lambda x: {"pixels": x[:, :10]}, "invalid_shape"),
    (lambda x: {"wrong": x}, "unknown_input"),
])
def test_bad_tensors_are_refused(client, mutate, code):
    with pytest.raises(FerryError) as err:
        client.infer("digits", mutate(_digits(2)))
    assert err.value.code == code and err.value.status == 400
    assert client.infer("digits", {"pixels": _digits(1)})["probabilities"].shape == (1, 10)


def test_unknown_model(client):
    with pytest.raises(FerryError) as err:
        client.infer("nope", {"pixels": _digits(1)})
    assert err.value.code == "model_not_found" and err.value.status == 404


def test_wrong_protocol_version_is_refused(client):
    frames = P.encode(P.StatsQuery("v-test"))
    import msgpack
    header = msgpack.unpackb(frames[0])
    header["v"] = 99
    reply, _ = client.send_raw([msgpack.packb(header)])
    assert isinstance(reply, P.ErrorReply) and reply.code == "protocol_version"


def test_garbage_frames_are_refused(client):
    reply, _ = client.send_raw([b"\xc1\xff not msgpack"])
    assert isinstance(reply, P.ErrorReply) and reply.code == "bad_message"
    # a header whose inline frame is missing
    msg = P.Infer("m1", "digits", 0, [P.TensorRef("pixels", "float32", (1, 64), frame=0)])
    reply, _ = client.send_raw(P.encode(msg))
    assert isinstance(reply, P.ErrorReply) and reply.code == "bad_message"
    # an inline frame shorter than its shape says
    reply, _ = client.send_raw(P.encode(msg, [b"\0" * 10]))
    assert isinstance(reply, P.ErrorReply) and reply.code == "invalid_shape"


def test_an_empty_tensor_no_array_could_hold_is_refused(client):
    """[0, 2**39, 2**39] passes the header's bounds and holds 0 bytes, but numpy cannot make
    it: the codec refuses it as the client's error, not as a 500."""
    msg = P.Infer("huge0", "digits", 0,
                  [P.TensorRef("pixels", "float32", (0, 2**39, 2**39), frame=0)])
    reply, _ = client.send_raw(P.encode(msg, [b""]))
    assert isinstance(reply, P.ErrorReply) and (reply.status, reply.code) == \
        (400, "invalid_shape"), reply
    assert client.infer("digits", {"pixels": _digits(1)})["probabilities"].shape == (1, 10)


@pytest.mark.parametrize("arr", [np.zeros((1, 64), np.complex64), np.array([["a"] * 64])])
def test_the_client_refuses_before_sending_what_the_server_refuses(client, arr):
    """The client encodes with the daemon's codec: an array the daemon refuses never leaves
    the client, and the daemon refuses the same tensor sent by hand."""
    msg = P.Infer("raw-dtype", "digits", 0,
                  [P.TensorRef("pixels", arr.dtype.name, arr.shape, frame=0)])
    reply, _ = client.send_raw(P.encode(msg, [arr.tobytes()]))
    assert isinstance(reply, P.ErrorReply) and 400 <= reply.status < 500, reply
    with pytest.raises(FerryError) as err:
        client.infer("digits", {"pixels": arr})
    assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_dtype",
                                                                    "pixels")


def test_shared_memory_references_are_bounds_checked(client):
    client.register_region("bounds-region", 4096)
    region_size = client.region.arena.size
    bad = [
        (P.ShmLoc("bounds-region", region_size - 64, 256), "shm_out_of_bounds"),
        (P.ShmLoc("never-registered", 0, 256), "shm_unknown_region"),
    ]
    for loc, code in bad:
        ref = P.TensorRef("pixels", "float32", (1, 64), shm=loc)
        reply, _ = client.send_raw(P.encode(P.Infer(f"b-{code}", "digits", 0, [ref])))
        assert isinstance(reply, P.ErrorReply) and reply.code == code, reply
    # a region key naming one of Ferry's own segments is refused
    reply, _ = client.send_raw(P.encode(P.RegisterRegion("r-own", "sneaky", "ferry-abc-eng-1",
                                                         0, 64)))
    assert isinstance(reply, P.ErrorReply) and reply.code == "shm_bad_region"
    assert client.infer("digits", {"pixels": _digits(1)})["probabilities"].shape == (1, 10)
