"""Runs batch jobs: claims pending items from the state database, executes them through the
frontend's Dispatcher, stores results, and sends each finished job's signed webhook.

It runs inside HTTP worker 0 only (frontends/http/batches.py starts it), so one runner serves a
state directory. At start it puts items left `running` by a stopped or crashed runner back to
pending (`claim_unfinished`), so every job finishes after a restart. An item interrupted
mid-execution runs again: items are executed at least once and recorded once.

Webhooks: when a job reaches a terminal state the store writes a delivery row in the same
transaction. The runner leases it, POSTs the job summary with
`X-Ferry-Signature: sha256=<hex HMAC-SHA256 of the body>`, `X-Ferry-Delivery: <job id>` and
`X-Ferry-Event: batch.<status>`, then records the attempt; a failure is retried after
2, 4, 8 … s (the store's back-off, 8 attempts at most). A recorded delivery is never sent
again, across any restart; only a crash between the POST and its record can repeat one, after
the lease, which is why receivers de-duplicate on `X-Ferry-Delivery`.

Every item is charged to the key that submitted its job as a direct request would be (the
`charge` hook, frontends/access.py's `Access.batch_item`): a concurrency slot, a request from
its requests per minute and, for generations, prompt plus max_tokens reserved from its tokens
per minute. An item waits for that budget rather than failing; while one of a key's items
waits, the runner claims no further items of that key's jobs, so other jobs keep running.

Item requests are stored as `{"custom_id", "url", "body"}` with url one of
`/v2/models/{model}[/versions/{v}]/infer` (KServe JSON tensors), `/v1/chat/completions` or
`/v1/completions` (when the LLM helpers of frontends/http/textgen.py are present), or
`/v1/images/generations` (an image model; the body is OpenAI's, the result OpenAI's images
response). An image item's images count `units_per_image` each against the key's tokens per
minute, as on every other path: the result's `usage.total_tokens` (a KServe item to an image
model reports its units there too).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from daemon.egress import EgressPolicy
from daemon.errors import FerryError, InternalError, InvalidInput, Overloaded
from daemon.state.batches import BatchItem, BatchStore, JobStatus, signature_header, webhook_body
from frontends.http.images import (image_usage, in_openai_terms, openai_images_body,
                                   parse_openai_images, reserve_tensor_units, run_images)
from frontends.http.kserve_codec import encode_outputs, parse_infer
from frontends.http.openai_schema import parse_chat, parse_completion
from frontends.http.textgen import Generation, encode_prompts

__all__ = ["BatchRunner", "ItemExecutor", "ItemCharger", "INFER_URL", "TEXT_URLS", "IMAGES_URL",
           "OWNER"]

log = logging.getLogger(__name__)

INFER_URL = re.compile(r"/v2/models/([^/]+)(?:/versions/([0-9]{1,9}))?/infer")
TEXT_URLS = ("/v1/chat/completions", "/v1/completions")
IMAGES_URL = "/v1/images/generations"
_WEBHOOK_TIMEOUT_S = 10.0
_WEBHOOK_LEASE_S = 60.0
OWNER = "_ferry_owner"       # the job metadata entry naming the key that submitted it

# owner -> a context that holds the owner's budget for one item (entering waits for it) and
# yields an object whose `used` the runner sets to the tokens the item used.
ItemCharger = Callable[[str | None], AbstractAsyncContextManager[Any]]


class ItemExecutor:
    """Turns one stored item into its response body (or raises FerryError)."""

    def __init__(self, dispatcher: Any, texts: Any | None = None,
                 timeout_s: float = 300.0) -> None:
        self.d, self.texts, self.timeout_s = dispatcher, texts, timeout_s

    async def __call__(self, item: BatchItem) -> dict[str, Any]:
        url, body = item.request.get("url"), item.request.get("body")
        if not isinstance(body, dict):
            raise InvalidInput("the item's body must be an object", param="body")
        rid = f"{item.job_id}-{item.idx}"
        match = INFER_URL.fullmatch(url) if isinstance(url, str) else None
        if match is not None:
            version = int(match.group(2)) if match.group(2) else None
            return await self.tensor(match.group(1), version, body, rid)
        if url in TEXT_URLS:
            return await self.text(url == TEXT_URLS[0], body, rid)
        if url == IMAGES_URL:
            return await self.images(body, rid)
        raise InvalidInput(f"unsupported url {url!r}", code="unsupported_endpoint", param="url")

    async def tensor(self, model: str, version: int | None, body: dict[str, Any],
                     rid: str) -> dict[str, Any]:
        parsed = parse_infer(json.dumps(body).encode(), None)
        if parsed.region_refs or any(o.shm is not None for o in parsed.outputs or ()):
            raise InvalidInput("batch items cannot use shared-memory regions",
                               code="unsupported_parameter")
        parsed.binary_default = False          # results are stored as JSON
        for out in parsed.outputs or ():
            out.binary = False
        timeout = parsed.timeout_ms / 1000 if parsed.timeout_ms else self.timeout_s
        units = await reserve_tensor_units(self.d, model, version, parsed.arrays)
        outcome = await self.d.infer(model, version, parsed.arrays,
                                     outputs=[o.name for o in parsed.outputs]
                                     if parsed.outputs else None,
                                     timeout_s=timeout, request_id=rid)
        try:
            entries, _ = encode_outputs(outcome.arrays, parsed, {})
        finally:
            outcome.release()
        result: dict[str, Any] = {"model_name": outcome.model,
                                  "model_version": str(outcome.version), "outputs": entries}
        if parsed.id is not None:
            result["id"] = parsed.id
        if units:
            result["usage"] = image_usage(units)
        return result

    async def images(self, body: dict[str, Any], rid: str) -> dict[str, Any]:
        job = parse_openai_images(self.d, body)
        try:
            pngs, seeds = await run_images(self.d, job, timeout_s=self.timeout_s,
                                           request_id=rid)
        except FerryError as exc:
            raise in_openai_terms(exc)
        return openai_images_body(job, pngs, seeds)

    async def text(self, chat: bool, body: dict[str, Any], rid: str) -> dict[str, Any]:
        if self.texts is None:
            raise InvalidInput("text generation is not available in this daemon",
                               code="unsupported_endpoint", param="url")
        body = {**body, "stream": False}
        body.pop("stream_options", None)
        if chat:
            req: Any = parse_chat(body)
            tm = await self.texts.text_model(req.model)
            prompts = [await tm.encode(tm.render_chat(req.messages), add_special_tokens=False)]
        else:
            req = parse_completion(body)
            tm = await self.texts.text_model(req.model)
            prompts = await encode_prompts(tm, req.prompts)
        gen = await Generation.start(self.d, tm, prompts, req.params, request_id=rid,
                                     prompt_param="messages" if chat else "prompt")
        texts: list[list[str]] = [[] for _ in gen.choices]
        finish: list[str | None] = [None] * len(gen.choices)
        async with gen:
            async for piece in gen.pieces():
                texts[piece.index].append(piece.text)
                finish[piece.index] = piece.finish_reason or finish[piece.index]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                        "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": tm.name, "choices": choices,
                "usage": gen.usage.to_dict()}


class BatchRunner:
    """Claims and executes items of open jobs, oldest job first, `concurrency` at a time."""

    def __init__(self, store: BatchStore, execute: Callable[[BatchItem], Awaitable[dict]], *,
                 concurrency: int = 8, poll_s: float = 0.5,
                 webhook_timeout_s: float = _WEBHOOK_TIMEOUT_S,
                 egress: EgressPolicy | None = None,
                 charge: ItemCharger | None = None) -> None:
        self.store, self.execute, self.charge = store, execute, charge
        self._waiting: Counter[str | None] = Counter()    # owners with an item waiting for budget
        self.egress = egress or EgressPolicy()
        self.concurrency, self.poll_s, self.webhook_timeout_s = concurrency, poll_s, \
            webhook_timeout_s
        self._wake = asyncio.Event()
        self._items: set[asyncio.Task] = set()
        self._sends: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None
        self._session: Any = None

    async def start(self) -> None:
        requeued = await self.store.claim_unfinished()
        if requeued:
            log.info("batches: resuming %d unfinished job(s)", len(requeued))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=self.egress.resolver()))
        self._loop_task = asyncio.create_task(self._loop(), name="batch-runner")

    def wake(self) -> None:
        """A job was created or an item finished: look for work now rather than at the poll."""
        self._wake.set()

    def pause(self) -> None:
        """Stop claiming items and starting webhook sends (the process is draining); what runs
        goes on until `stop`."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop claiming; let webhook sends finish (bounded); cancel running items, which
        stay `running` in the store and run again after the next start."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._sends:
            await asyncio.wait(list(self._sends.values()), timeout=grace_s)
        tasks = [*self._items, *self._sends.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._fill()
                await self._send_webhooks()
            except (FerryError, sqlite3.Error) as exc:
                log.warning("batch runner: %s; retrying", exc)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    async def _open_jobs(self) -> list[tuple[str, str | None]]:
        """(job id, owner) of open jobs, oldest first."""
        jobs = []
        for status in (JobStatus.RUNNING, JobStatus.PENDING):
            page, _ = await self.store.list(status=status, limit=100)
            jobs.extend(page)
        return [(j.id, (j.metadata or {}).get(OWNER))
                for j in sorted(jobs, key=lambda j: j.created_at)]

    async def _fill(self) -> None:
        free = self.concurrency - len(self._items)
        if free <= 0:
            return
        for job_id, owner in await self._open_jobs():
            if self._waiting[owner] > 0:
                continue               # its key is out of budget: serve other jobs meanwhile
            for item in await self.store.claim_items(job_id, free):
                task = asyncio.create_task(self._run_item(item, owner))
                self._items.add(task)
                free -= 1
            if free <= 0:
                return

    async def _run_item(self, item: BatchItem, owner: str | None = None) -> None:
        try:
            result, error = await self._charged(item, owner)
            job = await self.store.complete_item(item.job_id, item.idx, result=result,
                                                 error=error)
            if job.status != JobStatus.RUNNING:
                log.info("batch %s %s", job.id, job.status.value)
        except (FerryError, sqlite3.Error) as exc:
            log.error("batch %s item %d: result not stored (%s); it runs again after restart",
                      item.job_id, item.idx, exc)
        finally:
            self._items.discard(asyncio.current_task())
            self.wake()

    async def _charged(self, item: BatchItem, owner: str | None
                       ) -> tuple[dict | None, dict | None]:
        """(result, error) of one item, run on its owner's budget when there is a charger."""
        if self.charge is None:
            return await self._execute(item)
        self._waiting[owner] += 1
        admitted = False
        try:
            async with self.charge(owner) as bill:
                admitted = True
                self._waiting[owner] -= 1
                result, error = await self._execute(item)
                usage = (result or {}).get("body", {}).get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                    bill.used = usage["total_tokens"]
                elif error is None:
                    bill.used = 0           # a tensor item: no tokens
                return result, error
        finally:
            if not admitted:
                self._waiting[owner] -= 1

    async def _execute(self, item: BatchItem) -> tuple[dict | None, dict | None]:
        while True:
            try:
                return {"status_code": 200, "body": await self.execute(item)}, None
            except Overloaded as exc:   # load shedding: an item waits its turn, never fails
                await asyncio.sleep(min(max(exc.retry_after, 0.05), 5.0))
            except FerryError as exc:
                return None, exc.to_wire()
            except Exception as exc:   # a defect, not the request's: fail the item, go on
                log.exception("batch %s item %d failed", item.job_id, item.idx)
                return None, InternalError(f"internal error: {exc}").to_wire()

    # -- webhooks -----------------------------------------------------------------------------
    async def _send_webhooks(self) -> None:
        for delivery in await self.store.pending_webhooks():
            if delivery.job_id not in self._sends:
                self._sends[delivery.job_id] = asyncio.create_task(
                    self._deliver(delivery.job_id))

    async def _deliver(self, job_id: str) -> None:
        try:
            claimed = await self.store.claim_webhook(job_id, lease_s=_WEBHOOK_LEASE_S)
            if claimed is None:
                return
            delivery, secret = claimed
            job = await self.store.get(job_id)
            body = webhook_body(job)
            headers = {"Content-Type": "application/json", "User-Agent": "ferry-webhook/1",
                       "X-Ferry-Delivery": job_id, "X-Ferry-Event": f"batch.{job.status.value}"}
            if secret:
                headers["X-Ferry-Signature"] = signature_header(secret, body)
            status, error = None, None
            try:
                await self.egress.check_url(delivery.url, resolve=False)   # literal addresses
                async with self._session.post(
                        delivery.url, data=body, headers=headers, allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=self.webhook_timeout_s)) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            except InvalidInput as exc:           # refused by the egress policy
                error = exc.message[:500]
            ok = status is not None and 200 <= status < 300
            done = await self.store.record_webhook_attempt(job_id, delivered=ok, status=status,
                                                           error=error)
            log.info("batch %s: webhook attempt %d %s (%s)", job_id, done.attempts,
                     "delivered" if ok else "failed", status or error)
        except (FerryError, sqlite3.Error) as exc:
            log.warning("batch %s: webhook bookkeeping failed: %s", job_id, exc)
        finally:
            self._sends.pop(job_id, None)
