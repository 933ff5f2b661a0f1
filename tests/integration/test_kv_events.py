"""KV-cache events from a real daemon: a model whose model.toml sets `[llm] kv_events_endpoint`
publishes vLLM-format batches; a subscriber sees one BlockStored hash per full prompt block, and a
second request sharing the system prompt stores only its new blocks, chained to the shared ones."""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.integration.daemon_proc import Daemon
from tests.kv_event_subscriber import Batch, Stored, Subscriber

pytestmark = pytest.mark.timeout(120)

SYSTEM = ("You are a meticulous assistant for a shipping company. " * 20).strip()
BLOCK = 16                                  # the demo smollm2's [llm] block_size


@pytest.fixture(scope="module")
def llm(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """smollm2 with KV events on: its weights linked, its model.toml extended."""
    sock_dir = Path(tempfile.mkdtemp(prefix="fykv", dir="/tmp"))
    endpoint = f"ipc://{sock_dir}/kv.sock"
    repo = tmp_path_factory.mktemp("repo")
    vdir = repo / "smollm2" / "1"
    vdir.mkdir(parents=True)
    for f in (demo_models / "smollm2" / "1").iterdir():
        if f.name != "model.toml":
            (vdir / f.name).symlink_to(f)
    toml = (demo_models / "smollm2" / "1" / "model.toml").read_text()
    assert f"block_size = {BLOCK}" in toml
    (vdir / "model.toml").write_text(toml + f'kv_events_endpoint = "{endpoint}"\n')
    d = Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=180)
    yield d, endpoint
    assert d.stop() == 0
    shutil.rmtree(sock_dir, ignore_errors=True)


def _chat(d: Daemon, system: str, user: str) -> dict:
    body = json.dumps({"model": "smollm2", "temperature": 0, "max_tokens": 1, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": user}]}).encode()
    req = urllib.request.Request(d.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _join(d: Daemon, sub: Subscriber) -> Batch:
    """PUB drops messages until a subscription reaches it: send distinct probe prompts until
    one's events arrive, then drain whatever else is in flight."""
    for i in range(40):
        _chat(d, f"Probe number {i}. " * 8, "hello")
        batch = sub.recv(1.0)
        if batch is not None:
            while sub.recv(0.3) is not None:
                pass
            return batch
    raise AssertionError("no KV event reached the subscriber")


def _hashes(events: list) -> list[int]:
    return [h for e in events if isinstance(e, Stored) for h in e.block_hashes]


def test_shared_system_prompt_blocks_are_stored_once(llm):
    d, endpoint = llm
    sub = Subscriber(endpoint)
    try:
        probe = _join(d, sub)
        assert probe.topic == f"kv@{socket.gethostname()}@smollm2".encode()
        assert probe.data_parallel_rank == 0

        first = _chat(d, SYSTEM, "Where is my parcel?")
        p1 = first["usage"]["prompt_tokens"]
        assert p1 > 8 * BLOCK
        n1 = p1 // BLOCK                        # max_tokens 1: only the prompt is computed
        ev1 = sub.events_until(lambda evs: len(_hashes(evs)) >= n1, 20)
        chain1 = _hashes(ev1)
        assert len(chain1) == n1 and len(set(chain1)) == n1
        stored1 = [e for e in ev1 if isinstance(e, Stored)]
        assert stored1[0].parent_block_hash is None
        assert all(e.block_size == BLOCK and e.medium == "GPU" and e.lora_id is None
                   and len(e.token_ids) == BLOCK * len(e.block_hashes) for e in stored1)
        for prev, nxt in zip(stored1, stored1[1:]):         # a chunked prefill continues it
            assert nxt.parent_block_hash == prev.block_hashes[-1]

        second = _chat(d, SYSTEM, "Can I change the delivery address? " * 6)
        p2 = second["usage"]["prompt_tokens"]
        shared = second["usage"]["prompt_tokens_details"]["cached_tokens"] // BLOCK
        assert shared >= len(SYSTEM) // (8 * BLOCK)   # the system prompt is many blocks
        n2 = p2 // BLOCK - shared
        assert n2 >= 1
        ev2 = sub.events_until(lambda evs: len(_hashes(evs)) >= n2, 20)
        assert len(_hashes(ev2)) == n2 and not set(_hashes(ev2)) & set(chain1)
        stored2 = [e for e in ev2 if isinstance(e, Stored)]
        # the new blocks hang off the last shared block of the first request's chain
        assert stored2[0].parent_block_hash == chain1[shared - 1]
        assert sub.recv(0.3) is None                         # nothing else was stored
    finally:
        sub.close()
