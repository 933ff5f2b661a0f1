"""Per-key limits hold for every unit of work, batch items included, against a real daemon
with real keys: a batch's items are charged to the submitting key's requests and tokens per
minute (they wait for budget, never fail for it), and token budgets are reserved at admission
(prompt + max_tokens), so a key never gets more tokens through than its limit."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytestmark = pytest.mark.timeout(240)

INFER = "/v2/models/digits/infer"
RPM = 20                      # refills one request every 3 s
TPM = 200
PROMPT = list(range(100, 130))   # 30 token ids: usage is exact (ignore_eos, fixed max_tokens)
MAX_TOKENS = 16
COST = len(PROMPT) + MAX_TOKENS  # 46: four fit in TPM, a fifth needs 30 more (9 s of refill)


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "smollm2")),
                     workers=1, extra_config="[auth]\nrequired = true\n",
                     env={"FERRY_TORCH_THREADS": "1"})

    async def seed(state) -> dict[str, str]:
        k = state.keys
        return {"admin": (await k.create("watcher", scopes=["infer", "admin"])).plaintext,
                "rpm": (await k.create("batch-rpm", rpm=RPM)).plaintext,
                "tpm": (await k.create("batch-tpm", tpm=TPM)).plaintext,
                "direct": (await k.create("direct-tpm", tpm=TPM)).plaintext,
                "zmq": (await k.create("zmq-tpm", tpm=TPM)).plaintext}
    d.keys = d.state(seed)
    d.start(timeout_s=180)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _job(d: SecureDaemon, job_id: str) -> dict:
    """The job, read with an unlimited admin key (reads by the owner would spend its budget)."""
    status, _, job = call(d, "GET", f"/v1/batches/{job_id}", key=d.keys["admin"])
    assert status == 200, job
    return job


def _digit_items(n: int) -> list[dict]:
    row = np.zeros(64, dtype=np.float32).tolist()
    return [{"custom_id": f"d{i}", "url": INFER,
             "body": {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                  "data": row}]}} for i in range(n)]


def _completion(max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0}


def test_batch_items_count_against_requests_per_minute_and_wait_for_budget(ferry):
    key = ferry.keys["rpm"]
    started = time.monotonic()
    status, _, job = call(ferry, "POST", "/v1/batches", key=key,
                          body={"requests": _digit_items(RPM + 3)})   # submission: 1 request
    assert status == 201, job
    # The first RPM - 1 items take the rest of the minute's requests ...
    wait_until(lambda: _job(ferry, job["id"])["request_counts"]["completed"] >= RPM - 1,
               60, "the items the budget allows")
    status, headers, err = call(ferry, "POST", INFER, key=key, body=_digit_items(1)[0]["body"])
    assert status == 429, (status, err)
    assert headers["X-RateLimit-Remaining"] == "0"
    # ... and the other four wait for the bucket to refill (one per 3 s), then succeed.
    done = wait_until(lambda: (lambda j: j if j["ferry_status"] == "completed" else None)(
        _job(ferry, job["id"])), 90, "the batch to complete")
    elapsed = time.monotonic() - started
    assert done["request_counts"] == {"total": RPM + 3, "completed": RPM + 3, "failed": 0}
    assert elapsed >= 3 * 60 / RPM, f"4 items over budget finished after {elapsed:.1f} s"


def test_batch_generations_reserve_tokens_and_wait_for_them(ferry):
    key = ferry.keys["tpm"]
    items = [{"custom_id": f"g{i}", "url": "/v1/completions", "body": _completion()}
             for i in range(5)]
    status, _, job = call(ferry, "POST", "/v1/batches", key=key, body={"requests": items})
    assert status == 201, job
    wait_until(lambda: _job(ferry, job["id"])["request_counts"]["completed"] >= 4,
               120, "the four generations the token budget allows")
    # For the next 3 s (a fifth needs 9 s of refill) the fifth must not run.
    watch_until = time.monotonic() + 3.0
    while time.monotonic() < watch_until:
        counts = _job(ferry, job["id"])["request_counts"]
        assert counts["completed"] == 4 and counts["failed"] == 0, counts
    # The fifth waits (~9 s of refill), then runs: items never fail for lack of budget.
    wait_until(lambda: _job(ferry, job["id"])["ferry_status"] == "completed", 90,
               "the fifth generation")
    status, _, results = call(ferry, "GET", f"/v1/batches/{job['id']}/results",
                              key=ferry.keys["admin"])
    assert status == 200
    assert [r["status"] for r in results["data"]] == ["done"] * 5, results
    assert {r["response"]["body"]["usage"]["total_tokens"] for r in results["data"]} == {COST}


def test_direct_generations_reserve_prompt_plus_max_tokens(ferry):
    key = ferry.keys["direct"]
    status, _, err = call(ferry, "POST", "/v1/completions", key=key,
                          body=_completion(max_tokens=TPM))       # could never fit
    assert status == 429 and error_code(err) == "request_exceeds_token_limit", err
    spent = 0
    for _ in range(TPM // COST):                                  # four fit: 184 tokens
        status, headers, body = call(ferry, "POST", "/v1/completions", key=key,
                                     body=_completion())
        assert status == 200, body
        spent += body["usage"]["total_tokens"]
    # 16 tokens left (plus a little refill): a fifth would cross 200, so it is refused up
    # front rather than let through into debt.
    status, headers, err = call(ferry, "POST", "/v1/completions", key=key, body=_completion())
    assert status == 429 and error_code(err) == "token_rate_limited", (status, err)
    assert spent <= TPM and int(headers["Retry-After"]) >= 1


def test_zmq_generations_reserve_prompt_plus_max_tokens(ferry):
    """ZMQ Generates are charged like HTTP ones: one over the whole limit is refused, four
    of prompt + max_tokens fit, the fifth is refused before it reaches the engine."""
    from daemon.errors import FerryError
    from frontends.client import AsyncFerryClient

    async def generate(max_tokens: int) -> int:
        c = AsyncFerryClient(ferry.zmq_endpoint, timeout_s=60, api_key=ferry.keys["zmq"])
        try:
            n = 0
            async for tok in c.generate("smollm2", PROMPT, {"max_tokens": max_tokens,
                                                            "ignore_eos": True,
                                                            "temperature": 0}):
                n += len(tok.token_ids)
            return n
        finally:
            await c.close()

    def refused(max_tokens: int) -> str:
        with pytest.raises(FerryError) as err:
            asyncio.run(generate(max_tokens))
        assert err.value.status == 429, err.value
        return err.value.code

    assert refused(TPM) == "request_exceeds_token_limit"
    for _ in range(TPM // COST):
        assert asyncio.run(generate(MAX_TOKENS)) == MAX_TOKENS
    assert refused(MAX_TOKENS) == "token_rate_limited"
