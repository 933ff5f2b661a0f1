"""Batch jobs: persistence across restarts, item lifecycle, cancel, webhook once, signatures."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json

import pytest

from daemon.errors import FerryError, InvalidInput
from daemon.state import open_state
from daemon.state.batches import (
    BatchStore,
    ItemStatus,
    JobStatus,
    sign,
    signature_header,
    verify_signature,
    webhook_body,
)

pytestmark = pytest.mark.timeout(30)
ROUTE = "/v1/chat/completions"


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def requests(n: int) -> list[dict]:
    return [{"custom_id": f"r{i}", "model": "smollm2",
             "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]


@async_test
async def test_job_survives_restart_and_resumes(tmp_path):
    state = await open_state(tmp_path)
    job = await state.batches.create(ROUTE, requests(5), model="smollm2",
                                     webhook_url="https://hooks.example/ferry",
                                     webhook_secret="whsec", metadata={"team": "a"})
    assert job.status is JobStatus.PENDING and job.total == 5 and job.counts["pending"] == 5
    claimed = await state.batches.claim_items(job.id, 3)
    assert [it.idx for it in claimed] == [0, 1, 2] and claimed[0].attempts == 1
    assert claimed[1].request["messages"][0]["content"] == "q1"
    await state.batches.complete_item(job.id, 0, result={"text": "a0"})
    await state.close()                                    # the daemon dies here

    state = await open_state(tmp_path)
    try:
        assert await state.batches.claim_unfinished() == [job.id]
        job = await state.batches.get(job.id)
        assert job.status is JobStatus.RUNNING and job.metadata == {"team": "a"}
        assert job.counts == {"pending": 4, "running": 0, "done": 1, "failed": 0,
                              "cancelled": 0}
        rest = await state.batches.claim_items(job.id, 10)
        assert [it.idx for it in rest] == [1, 2, 3, 4]
        assert [it.attempts for it in rest] == [2, 2, 1, 1]
        for it in rest[:-1]:
            await state.batches.complete_item(job.id, it.idx, result={"text": f"a{it.idx}"})
        done = await state.batches.complete_item(job.id, 4, error={"code": "busy"})
        assert done.status is JobStatus.COMPLETED and done.completed_at is not None
        assert done.counts["done"] == 4 and done.counts["failed"] == 1
        items = await state.batches.items(job.id)
        assert items[0].result == {"text": "a0"} and items[4].error == {"code": "busy"}
        assert items[4].status is ItemStatus.FAILED and items[0].custom_id == "r0"
        assert await state.batches.claim_unfinished() == []
        assert [d.job_id for d in await state.batches.pending_webhooks()] == [job.id]
    finally:
        await state.close()


@async_test
async def test_cancel(tmp_path):
    state = await open_state(tmp_path)
    try:
        job = await state.batches.create(ROUTE, requests(4))
        await state.batches.claim_items(job.id, 1)
        cancelled = await state.batches.cancel(job.id)
        assert cancelled.status is JobStatus.CANCELLED
        assert cancelled.counts["cancelled"] == 3 and cancelled.counts["running"] == 1
        assert await state.batches.claim_items(job.id, 10) == []
        # the item that was running still records its result; the job stays cancelled
        after = await state.batches.complete_item(job.id, 0, result={"ok": True})
        assert after.status is JobStatus.CANCELLED and after.counts["done"] == 1
        assert (await state.batches.cancel(job.id)).status is JobStatus.CANCELLED  # idempotent
        assert await state.batches.claim_unfinished() == []

        finished = await state.batches.create(ROUTE, requests(1))
        await state.batches.claim_items(finished.id, 1)
        await state.batches.complete_item(finished.id, 0, result=1)
        with pytest.raises(FerryError) as err:
            await state.batches.cancel(finished.id)
        assert err.value.code == "batch_finished" and err.value.status == 409
        with pytest.raises(FerryError) as err:
            await state.batches.cancel("batch_nope")
        assert err.value.code == "batch_not_found" and err.value.status == 404
    finally:
        await state.close()


@async_test
async def test_webhook_is_sent_once_even_across_restart(tmp_path):
    clock = Clock()
    state = await open_state(tmp_path)
    store = BatchStore(state.db, clock=clock)
    job = await store.create(ROUTE, requests(1), webhook_url="http://127.0.0.1:9/hook",
                             webhook_secret="s3cret")
    await store.claim_items(job.id, 1)
    await store.complete_item(job.id, 0, result={"x": 1})
    claim = await store.claim_webhook(job.id, lease_s=30)
    assert claim is not None and claim[1] == "s3cret" and claim[0].attempts == 1
    assert await store.claim_webhook(job.id) is None          # leased: nobody else sends
    delivery = await store.record_webhook_attempt(job.id, delivered=False, status=502)
    assert delivery.delivered_at is None and delivery.last_status == 502
    clock.t += 1.5
    assert await store.claim_webhook(job.id) is None          # backing off 2^1 s
    clock.t += 1.0
    assert (await store.claim_webhook(job.id))[0].attempts == 2
    delivered = await store.record_webhook_attempt(job.id, delivered=True, status=200)
    assert delivered.delivered_at == clock.t
    await state.close()

    state = await open_state(tmp_path)
    try:
        store = BatchStore(state.db, clock=clock)
        clock.t += 10_000
        assert await store.pending_webhooks() == []
        assert await store.claim_webhook(job.id) is None
        again = await store.record_webhook_attempt(job.id, delivered=False, status=500)
        assert again.delivered_at is not None                  # a late failure changes nothing
    finally:
        await state.close()


@async_test
async def test_crashed_sender_lease_expires(tmp_path):
    clock = Clock()
    state = await open_state(tmp_path)
    try:
        store = BatchStore(state.db, clock=clock)
        job = await store.create(ROUTE, requests(1), webhook_url="https://h.example/x")
        await store.cancel(job.id)                             # terminal: webhook queued
        assert (await store.claim_webhook(job.id, lease_s=60))[1] is None
        clock.t += 61                                          # sender died mid-POST
        assert [d.job_id for d in await store.pending_webhooks()] == [job.id]
        assert (await store.claim_webhook(job.id))[0].attempts == 2
    finally:
        await state.close()


@async_test
async def test_list_and_items_paging(tmp_path):
    state = await open_state(tmp_path)
    try:
        ids = [(await state.batches.create(ROUTE, requests(3))).id for _ in range(5)]
        page, cursor = await state.batches.list(limit=2)
        page2, cursor2 = await state.batches.list(limit=2, cursor=cursor)
        page3, cursor3 = await state.batches.list(limit=2, cursor=cursor2)
        assert [j.id for j in page + page2 + page3] == ids[::-1] and cursor3 is None
        await state.batches.cancel(ids[0])
        assert [j.id for j in (await state.batches.list(status="cancelled"))[0]] == [ids[0]]
        items = await state.batches.items(ids[1], after=0, limit=1)
        assert [it.idx for it in items] == [1]
        assert json.dumps(page[0].to_dict())  # serialisable for the admin API
    finally:
        await state.close()


@pytest.mark.parametrize("items, kwargs, param", [
    ([], {}, "items"),
    ("not a list", {}, "items"),
    ([{"a": 1}, 5], {}, "items[1]"),
    ([{"custom_id": "x"}, {"custom_id": "x"}], {}, "items[1].custom_id"),
    ([{"a": {1, 2}}], {}, "items[0]"),
    ([{"a": 1}], {"webhook_url": "ftp://x/y"}, "webhook_url"),
    ([{"a": 1}], {"webhook_url": "https://"}, "webhook_url"),
    ([{"a": 1}], {"webhook_secret": "s"}, "webhook_secret"),
    ([{"a": 1}], {"metadata": [1]}, "metadata"),
])
def test_bad_jobs_are_refused(tmp_path, items, kwargs, param):
    async def body():
        state = await open_state(tmp_path)
        try:
            with pytest.raises(InvalidInput) as err:
                await state.batches.create(ROUTE, items, **kwargs)
            assert err.value.param == param
            assert (await state.batches.list())[0] == []
        finally:
            await state.close()
    asyncio.run(body())


def test_signature():
    body = b"The quick brown fox jumps over the lazy dog"
    expected = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert sign("key", body) == expected  # RFC 2104 HMAC-SHA256 reference value
    assert signature_header(b"key", body) == f"sha256={expected}"
    assert verify_signature("key", body, f"sha256={expected}")
    assert not verify_signature("key", body + b".", f"sha256={expected}")
    assert not verify_signature("other", body, f"sha256={expected}")
    assert hmac.new(b"key", body, hashlib.sha256).hexdigest() == expected


@async_test
async def test_webhook_body_is_canonical(tmp_path):
    state = await open_state(tmp_path)
    try:
        job = await state.batches.create(ROUTE, requests(2))
        body = webhook_body(await state.batches.get(job.id))
        assert body == webhook_body(await state.batches.get(job.id))
        assert json.loads(body)["id"] == job.id and b" " not in body
    finally:
        await state.close()
