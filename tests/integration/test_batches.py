"""Batch jobs against real `ferry serve` daemons (auth required, real SQLite state): KServe and
OpenAI-style (JSONL, chat and completions) jobs, validation, visibility, cancel, signed
webhooks with retries, and a job interrupted by SIGTERM that finishes after a restart with
its webhook delivered once."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time


import numpy as np
import pytest
from aiohttp import web

from daemon.state.batches import verify_signature
from tests.integration.lifecycle_models import slow_loop_repo
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import free_port, orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytestmark = pytest.mark.timeout(240)

INFER = "/v2/models/digits/infer"
# The test receivers listen on 127.0.0.1, which webhooks may reach only when allowed.
AUTH = "[auth]\nrequired = true\nwebhook_allow_cidrs = [\"127.0.0.0/8\"]\n"


class Receiver:
    """A webhook endpoint on 127.0.0.1 (aiohttp, own thread) that records every POST and
    answers 503 to the first `fail_first` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first, self.port = fail_first, free_port()
        self.hits: list[tuple[dict[str, str], bytes, int]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def received(self) -> list[tuple[dict[str, str], bytes, int]]:
        with self._lock:
            return list(self.hits)

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            status = 503 if len(self.hits) < self.fail_first else 200
            self.hits.append((dict(request.headers), body, status))
        return web.Response(status=status)

    def _serve(self) -> None:
        self._loop = loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()


def _digits(n: int) -> tuple[np.ndarray, list[dict]]:
    from daemon.demo import digits_split
    _, x, _, _ = digits_split()
    x = np.asarray(x[:n], dtype=np.float32)
    items = [{"custom_id": f"img-{i}", "url": INFER,
              "body": {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                   "data": row.tolist()}]}} for i, row in enumerate(x)]
    return x, items




def _seed(d: SecureDaemon) -> dict[str, str]:
    async def make(state) -> dict[str, str]:
        k = state.keys
        return {"admin": (await k.create("admin", scopes=["infer", "admin"])).plaintext,
                "owner": (await k.create("owner")).plaintext,
                "other": (await k.create("other")).plaintext,
                "digitsonly": (await k.create("digitsonly", models=["digits"])).plaintext}
    return d.state(make)


def _wait_job(d: SecureDaemon, key: str, job_id: str, status: str, timeout_s: float) -> dict:
    def poll():
        code, _, job = call(d, "GET", f"/v1/batches/{job_id}", key=key)
        assert code == 200, job
        return job if job["ferry_status"] == status else None
    return wait_until(poll, timeout_s, f"batch {job_id} to be {status}", interval=0.05)


def _delivered(d: SecureDaemon, job_id: str) -> bool:
    with sqlite3.connect(d.state_dir / "ferry.db") as db:
        row = db.execute("SELECT delivered_at FROM webhook_deliveries WHERE job_id = ?",
                         (job_id,)).fetchone()
    return row is not None and row[0] is not None


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    repo = tensor_repo(demo_models, tmp_path_factory, ("digits", "smollm2"))
    slow_loop_repo(repo)   # `slow` too, so a cancel reliably lands while items are pending
    d = SecureDaemon(repo, workers=2, extra_config=AUTH)
    d.keys = _seed(d)
    d.start(timeout_s=180)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def test_kserve_batch_results_and_signed_webhook_with_retry(ferry):
    x, items = _digits(20)
    direct = call(ferry, "POST", INFER, key=ferry.keys["owner"], body={"inputs": [
        {"name": "pixels", "shape": [20, 64], "datatype": "FP32",
         "data": x.reshape(-1).tolist()}]})[2]
    expected = np.asarray(direct["outputs"][0]["data"]).reshape(20, 10)
    with Receiver(fail_first=1) as hook:
        status, _, job = call(ferry, "POST", "/v1/batches", key=ferry.keys["owner"],
                              body={"requests": items, "webhook_url": hook.url,
                                    "metadata": {"run": "t1"}})
        assert status == 201, job
        secret = job["webhook_secret"]
        assert job["request_counts"]["total"] == 20 and job["metadata"] == {"run": "t1"}
        done = _wait_job(ferry, ferry.keys["owner"], job["id"], "completed", 60)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 20
        assert "webhook_secret" not in done
        wait_until(lambda: _delivered(ferry, job["id"]), 30, "the webhook delivery")
        hits = hook.received()
    assert [h[2] for h in hits] == [503, 200]           # failed once, retried, delivered
    assert hits[0][1] == hits[1][1]                    # a retry signs and sends the same bytes
    for headers, body, _ in hits:
        assert verify_signature(secret, body, headers["X-Ferry-Signature"])
        assert headers["X-Ferry-Delivery"] == job["id"]
        assert headers["X-Ferry-Event"] == "batch.completed"
    assert not verify_signature("another secret", hits[1][1], hits[1][0]["X-Ferry-Signature"])
    payload = json.loads(hits[1][1])
    assert payload["id"] == job["id"] and payload["counts"]["done"] == 20

    status, _, res = call(ferry, "GET", f"/v1/batches/{job['id']}/results", key=ferry.keys["owner"])
    assert status == 200 and len(res["data"]) == 20
    for row in res["data"]:
        i = int(row["custom_id"].split("-")[1])
        out = row["response"]["body"]["outputs"][0]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        np.testing.assert_allclose(out["data"], expected[i], rtol=1e-5, atol=1e-6)
    page = call(ferry, "GET", f"/v1/batches/{job['id']}/results?after=4&limit=5",
                key=ferry.keys["owner"])[2]
    assert [r["index"] for r in page["data"]] == [5, 6, 7, 8, 9] and page["has_more"]


def test_openai_jsonl_batch_with_chat_and_completion(ferry):
    lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "smollm2", "max_tokens": 2, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "Say hi"}]}},
             {"custom_id": "text", "method": "POST", "url": "/v1/completions",
              "body": {"model": "smollm2", "prompt": "Once upon", "max_tokens": 2,
                       "ignore_eos": True}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/completions",
              "body": {"model": "smollm2", "prompt": "x", "max_tokens": -3}}]
    raw = "\n".join(json.dumps(line) for line in lines).encode()
    status, _, job = call(ferry, "POST", "/v1/batches", key=ferry.keys["owner"], raw=raw,
                          headers={"Content-Type": "application/jsonl"})
    assert status == 201 and job["endpoint"] == "mixed" and job["model"] == "smollm2", job
    _wait_job(ferry, ferry.keys["owner"], job["id"], "completed", 180)
    status, headers, text = call(ferry, "GET", f"/v1/batches/{job['id']}/results?format=jsonl",
                                 key=ferry.keys["owner"])
    assert status == 200 and headers["Content-Type"].startswith("application/jsonl")
    rows = {r["custom_id"]: r for r in map(json.loads, text.splitlines())}
    chat, comp, bad = rows["chat"], rows["text"], rows["bad"]
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert isinstance(chat["response"]["body"]["choices"][0]["message"]["content"], str)
    assert chat["response"]["body"]["usage"]["completion_tokens"] == 2
    assert comp["response"]["body"]["object"] == "text_completion"
    assert comp["response"]["body"]["usage"]["completion_tokens"] == 2
    assert bad["status"] == "failed" and bad["error"]["param"] == "max_tokens"
    assert bad["response"] is None


@pytest.mark.parametrize("body,status,code", [
    ({"requests": []}, 400, "invalid_input"),
    ({"requests": [{"url": "/v1/embeddings", "body": {"model": "digits"}}]}, 400,
     "unsupported_endpoint"),
    ({"requests": [{"url": INFER, "body": [1, 2]}]}, 400, "invalid_input"),
    ({"requests": [{"url": "/v1/completions", "body": {"prompt": "x"}}]}, 400,
     "missing_parameter"),
    ({"requests": [{"prompt": "x", "model": "smollm2"}], "endpoint": "/v1/completions",
      "webhook_url": "ftp://example.com/x"}, 400, "invalid_input"),
    ({"requests": [{"prompt": "x", "model": "smollm2"}], "endpoint": "/v1/completions",
      "metadata": {"_ferry_owner": "me"}}, 400, "invalid_input"),
    # Webhooks may not reach the metadata service, private networks or, unless allowed, loopback.
    *[({"requests": [{"prompt": "x", "model": "smollm2"}], "endpoint": "/v1/completions",
        "webhook_url": url}, 400, "webhook_url_not_allowed")
      for url in ("http://169.254.169.254/latest/meta-data/", "http://10.1.2.3:8080/hook",
                  "https://[fd00::1]/hook", "http://[::ffff:192.168.0.1]/", "http://0.0.0.0/")],
    ({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}, 400,
     "unsupported_parameter"),
    ({"requests": [{"custom_id": "a", "url": INFER, "body": {}},
                   {"custom_id": "a", "url": INFER, "body": {}}]}, 400, "invalid_input"),
])
def test_batch_submission_is_validated(ferry, body, status, code):
    got, _, err = call(ferry, "POST", "/v1/batches", key=ferry.keys["owner"], body=body)
    assert (got, error_code(err)) == (status, code), err


def test_batch_model_allow_list_auth_and_visibility(ferry):
    item = {"url": "/v1/completions", "body": {"model": "smollm2", "prompt": "x"}}
    got, _, err = call(ferry, "POST", "/v1/batches", key=ferry.keys["digitsonly"],
                       body={"requests": [item]})
    assert (got, error_code(err)) == (403, "model_not_allowed")
    got, _, err = call(ferry, "POST", "/v1/batches", body={"requests": [item]})
    assert (got, error_code(err)) == (401, "missing_credentials")
    _, items = _digits(2)
    status, _, job = call(ferry, "POST", "/v1/batches", key=ferry.keys["owner"],
                          body={"requests": items})
    assert status == 201
    path = f"/v1/batches/{job['id']}"
    assert error_code(call(ferry, "GET", path, key=ferry.keys["other"])[2]) == "batch_not_found"
    assert call(ferry, "POST", path + "/cancel", key=ferry.keys["other"])[0] == 404
    assert call(ferry, "GET", path + "/results", key=ferry.keys["other"])[0] == 404
    assert call(ferry, "GET", path, key=ferry.keys["admin"])[0] == 200
    mine = call(ferry, "GET", "/v1/batches?limit=100", key=ferry.keys["owner"])[2]["data"]
    theirs = call(ferry, "GET", "/v1/batches?limit=100", key=ferry.keys["other"])[2]["data"]
    assert job["id"] in {j["id"] for j in mine} and job["id"] not in {j["id"] for j in theirs}
    assert call(ferry, "GET", "/v1/batches?status=nope", key=ferry.keys["owner"])[0] == 400
    assert call(ferry, "GET", "/v1/batches/batch_nope", key=ferry.keys["owner"])[0] == 404


def test_cancel_stops_pending_items(ferry):
    items = [{"custom_id": f"s-{i}", "url": "/v2/models/slow/infer",
              "body": {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [float(i), 1.0, 2.0, 3.0]}]}} for i in range(200)]
    status, _, job = call(ferry, "POST", "/v1/batches", key=ferry.keys["owner"],
                          body={"requests": items})
    assert status == 201
    status, _, cancelled = call(ferry, "POST", f"/v1/batches/{job['id']}/cancel",
                                key=ferry.keys["owner"])
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    assert cancelled["counts"]["cancelled"] > 100
    # running items finish and are recorded; nothing stays pending
    final = wait_until(lambda: (lambda j: j if j["counts"]["running"] == 0 else None)(
        call(ferry, "GET", f"/v1/batches/{job['id']}", key=ferry.keys["owner"])[2]), 30,
        "running items to finish")
    assert final["counts"]["pending"] == 0
    assert call(ferry, "POST", f"/v1/batches/{job['id']}/cancel",
                key=ferry.keys["owner"])[0] == 200              # idempotent


def test_interrupted_batch_finishes_after_restart_and_webhook_arrives_once(tmp_path):
    # ~60 ms an item here (10 ms or more on fast hardware): 120 take seconds, so the SIGTERM
    # below lands mid-job; the draining worker stops claiming items at once.
    d = SecureDaemon(slow_loop_repo(tmp_path / "repo", iterations=600), workers=2,
                     extra_config=AUTH)
    keys = _seed(d)
    d.state(lambda st: st.users.create("root", "a long enough password"))
    n = 120
    items = [{"custom_id": f"x-{i}", "url": "/v2/models/slow/infer",
              "body": {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [float(i), 1.0, 2.0, 3.0]}]}} for i in range(n)]
    try:
        d.start()
        token = call(d, "POST", "/admin/login", body={"username": "root",
                                                      "password": "a long enough password"})[2]
        for i in range(3):
            assert call(d, "POST", "/v2/models/slow/infer", key=keys["owner"],
                        body=items[i]["body"],
                        headers={"X-Request-ID": f"before-restart-{i}"})[0] == 200
        logged_by = time.time()
        with Receiver() as hook:
            status, _, job = call(d, "POST", "/v1/batches", key=keys["owner"],
                                  body={"requests": items, "webhook_url": hook.url,
                                        "webhook_secret": "s3cret-for-hmac"})
            assert status == 201, job
            wait_until(lambda: _done_items(d, job["id"]) >= 3, 60, "the first items",
                       interval=0.005)
            assert d.stop() == 0                                  # SIGTERM, drain, exit 0
            with sqlite3.connect(d.state_dir / "ferry.db") as db:
                status_row = db.execute("SELECT status FROM batch_jobs WHERE id = ?",
                                        (job["id"],)).fetchone()
                done = db.execute("SELECT COUNT(*) FROM batch_items WHERE job_id = ? AND "
                                  "status = 'done'", (job["id"],)).fetchone()[0]
            assert status_row[0] in ("pending", "running") and 3 <= done < n, (status_row, done)
            assert hook.received() == []

            d.start()                                             # same state directory
            final = _wait_job(d, keys["owner"], job["id"], "completed", 120)
            assert final["request_counts"] == {"total": n, "completed": n, "failed": 0}
            wait_until(lambda: _delivered(d, job["id"]), 30, "the webhook delivery")
            hits = hook.received()
        assert len(hits) == 1, hits
        headers, body, _ = hits[0]
        assert verify_signature("s3cret-for-hmac", body, headers["X-Ferry-Signature"])
        assert json.loads(body)["status"] == "completed"
        rows = call(d, "GET", f"/v1/batches/{job['id']}/results?limit=1000",
                    key=keys["owner"])[2]["data"]
        assert len(rows) == n and all(r["response"]["status_code"] == 200 for r in rows)
        assert all(r["response"]["body"]["outputs"][0]["data"][0] == int(r["custom_id"][2:])
                   for r in rows)                               # each item's own result
        # keys, sessions (the JWT secret) and the request log survived the restart too
        log_rows = call(d, "GET", f"/admin/requests?limit=1000&until={logged_by}",
                        key=token["access_token"])
        assert log_rows[0] == 200, log_rows
        seen = {r["request_id"] for r in log_rows[2]["data"]}
        assert {f"before-restart-{i}" for i in range(3)} <= seen, d.log()[-6000:]
        log_text = d.log()
        assert all(k not in log_text for k in keys.values())
        assert "s3cret-for-hmac" not in log_text
    finally:
        code = d.stop(check=False)
    assert code == 0


def _done_items(d: SecureDaemon, job_id: str) -> int:
    """Items done, read from the database (no HTTP round trip between the check and SIGTERM)."""
    with sqlite3.connect(d.state_dir / "ferry.db", timeout=5) as db:
        return db.execute("SELECT COUNT(*) FROM batch_items WHERE job_id = ? AND "
                          "status = 'done'", (job_id,)).fetchone()[0]
