"""Batch jobs over HTTP (`infer` scope); frontends/http/batch_runner.py executes them in worker 0.

    POST /v1/batches                  create, from either body:
        application/json   {"requests": [item, ...], "endpoint"?: URL, "webhook_url"?,
                            "webhook_secret"?, "metadata"?: {...}}
                           an item is OpenAI's batch line {"custom_id"?, "method"?, "url",
                           "body"} or, with "endpoint", just the request body (+ "custom_id")
        application/jsonl  OpenAI batch input lines; `?endpoint=&webhook_url=` in the query,
        (x-ndjson)         the secret in `X-Ferry-Webhook-Secret`
    GET  /v1/batches[?status=&limit=&cursor=]
    GET  /v1/batches/{id}
    GET  /v1/batches/{id}/results[?after=&limit=]   JSON, or JSONL with `Accept:
                                                    application/jsonl` or `?format=jsonl`
    POST /v1/batches/{id}/cancel

URLs: /v2/models/{model}[/versions/{v}]/infer (KServe JSON tensors), /v1/chat/completions,
/v1/completions, /v1/images/generations (its `model` is required here). Every item's model is checked against the caller's allow-list on submission.
With a webhook and no secret, one is generated and returned once (`webhook_secret`): webhooks
are always signed. A job is visible to the credential that created it and to admins.
Submitting a batch counts as one request against the key's rate limit, and every item counts
as one more when it runs (its tokens too): items wait for the key's budget, they never fail
for it (frontends/http/batch_runner.py). Webhook URLs may point
anywhere the daemon can reach, including this host: grant `infer` keys accordingly.
"""
from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from frontends.http.batch_runner import (IMAGES_URL, INFER_URL, OWNER, TEXT_URLS, BatchRunner,
                                 ItemExecutor)
from daemon.egress import EgressPolicy
from daemon.errors import FerryError, InvalidInput
from daemon.state.batches import BatchJob, JobStatus
from frontends.http.admin import json_object
from frontends.http.appkeys import DISPATCHER, ON_DRAIN, SETTINGS
from frontends.http.json_body import decode_json
from frontends.access import Access, ItemCharge
from frontends.http.security import ACCESS, authorize_model, principal_of
from frontends.http.textgen import TOKEN_RESERVER

__all__ = ["routes", "setup", "RUNNER"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
RUNNER = web.AppKey("batch_runner", BatchRunner)
_OWNER = OWNER
_JSONL = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines",
          "application/jsonlines")
_STATUS = {JobStatus.PENDING: "validating", JobStatus.RUNNING: "in_progress",
           JobStatus.COMPLETED: "completed", JobStatus.CANCELLED: "cancelled"}
_CREATE_FIELDS = {"requests", "endpoint", "webhook_url", "webhook_secret", "metadata",
                  "completion_window"}


def setup(app: web.Application) -> None:
    app.add_routes(routes)
    app.on_startup.append(_start_runner)    # after cleanup contexts: the state is open
    app.on_shutdown.append(_stop_runner)    # before they close it


async def _start_runner(app: web.Application) -> None:
    settings = app.get(SETTINGS)
    if ACCESS not in app or settings is None or settings.worker != 0:
        return
    try:
        from frontends.http.textgen import TEXTS
        texts = app.get(TEXTS)
    except ModuleNotFoundError:
        texts = None
    access = app[ACCESS]
    runner = BatchRunner(access.state.batches,
                         _traced(app, ItemExecutor(app[DISPATCHER], texts,
                                                   settings.request_timeout_s)),
                         egress=access.egress, charge=lambda owner: _charge(access, owner))
    await runner.start()
    app[RUNNER] = runner
    if ON_DRAIN in app:
        app[ON_DRAIN].append(runner.pause)    # a SIGTERM stops claiming items at once


def _traced(app: web.Application, execute: Any) -> Any:
    """Each item is a trace of its own (`batch <url>`, kind internal, with the job id and item
    index), so its dispatch and engine spans are recorded as a request's are."""
    from frontends.http.tracing import TRACER
    from frontends.spans import ServerSpan

    async def run(item: Any) -> Any:
        tracer = app.get(TRACER)
        if tracer is None or not tracer.enabled:
            return await execute(item)
        root = ServerSpan(tracer, None, f"batch {item.request.get('url')}")
        root.record.kind = "internal"
        failed = True
        try:
            result = await execute(item)
            failed = False
            return result
        finally:
            root.end(failed, **{"ferry.batch_id": item.job_id, "ferry.batch_item": item.idx})
    return run


@asynccontextmanager
async def _charge(access: Access, owner: str | None) -> AsyncIterator[ItemCharge]:
    """One item on its owner's budget; its generation waits for the tokens it reserves."""
    async with access.batch_item(owner) as bill:
        admission = bill.admission
        if admission is None:
            yield bill
            return

        async def reserve(tokens: int) -> None:
            await access.reserve_waiting(admission, tokens)
        token = TOKEN_RESERVER.set(reserve)
        try:
            yield bill
        finally:
            TOKEN_RESERVER.reset(token)


async def _stop_runner(app: web.Application) -> None:
    runner = app.get(RUNNER)
    if runner is not None:
        await runner.stop()


def _store(request: web.Request) -> Any:
    access = request.app.get(ACCESS)
    if access is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    return access.state.batches


# -- submission ---------------------------------------------------------------------------------

def _item(raw: Any, i: int, endpoint: str | None) -> dict[str, Any]:
    """{"custom_id"?, "url", "body"} from either item form."""
    param = f"requests[{i}]"
    if not isinstance(raw, dict):
        raise InvalidInput(f"{param} must be an object", param=param)
    if "body" in raw:
        url, body = raw.get("url", endpoint), raw["body"]
        method = raw.get("method", "POST")
        if method != "POST":
            raise InvalidInput(f"{param}.method must be POST", param=f"{param}.method")
    else:
        body = {k: v for k, v in raw.items() if k != "custom_id"}
        url = endpoint
    if not isinstance(url, str) or not (url in TEXT_URLS or url == IMAGES_URL
                                        or INFER_URL.fullmatch(url)):
        raise InvalidInput(f"{param}.url must be /v1/chat/completions, /v1/completions, "
                           "/v1/images/generations or /v2/models/{model}/infer (or give "
                           "\"endpoint\")",
                           code="unsupported_endpoint", param=f"{param}.url")
    if not isinstance(body, dict):
        raise InvalidInput(f"{param}.body must be an object", param=f"{param}.body")
    item: dict[str, Any] = {"url": url, "body": body}
    if raw.get("custom_id") is not None:
        item["custom_id"] = raw["custom_id"]
    return item


def _model_of(item: dict[str, Any], param: str) -> str:
    match = INFER_URL.fullmatch(item["url"])
    model = match.group(1) if match else item["body"].get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput(f"{param}.body.model is required", code="missing_parameter",
                           param=f"{param}.body.model")
    return model


def _jsonl(raw: bytes) -> list[Any]:
    lines = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(decode_json(line))
        except InvalidInput as exc:
            raise InvalidInput(f"line {n}: {exc.message}", code=exc.code) from None
    return lines


async def _submission(request: web.Request) -> dict[str, Any]:
    """The creation body in one shape, whichever form it came in."""
    if request.content_type in _JSONL:
        q = request.query
        return {"requests": _jsonl(await request.read()), "endpoint": q.get("endpoint"),
                "webhook_url": q.get("webhook_url"),
                "webhook_secret": request.headers.get("X-Ferry-Webhook-Secret")}
    body = await json_object(request)
    unknown = set(body) - _CREATE_FIELDS
    if "input_file_id" in body:
        raise InvalidInput("file uploads are not supported: send the requests inline "
                           "(\"requests\": [...]) or as a JSONL body", code="unsupported_parameter",
                           param="input_file_id")
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}", code="unknown_parameter",
                           param=sorted(unknown)[0])
    return body


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    store = _store(request)
    sub = await _submission(request)
    raw, endpoint = sub.get("requests"), sub.get("endpoint")
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("'requests' must be a non-empty list", param="requests")
    if endpoint is not None and not isinstance(endpoint, str):
        raise InvalidInput("'endpoint' must be a string", param="endpoint")
    items = [_item(r, i, endpoint) for i, r in enumerate(raw)]
    models = set()
    for i, item in enumerate(items):
        model = _model_of(item, f"requests[{i}]")
        if model not in models:
            authorize_model(request, model)
            models.add(model)
    metadata = sub.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or any(str(k).startswith("_ferry") for k in metadata)):
        raise InvalidInput("'metadata' must be an object without _ferry… keys",
                           param="metadata")
    principal = principal_of(request)
    metadata = {**(metadata or {}), _OWNER: principal.id if principal is not None else None}
    url, secret = sub.get("webhook_url"), sub.get("webhook_secret")
    if isinstance(url, str):          # the store validates the form; this, the destination
        access = request.app.get(ACCESS)
        await (access.egress if access is not None else EgressPolicy()).check_url(url)
    generated = url is not None and secret is None
    if generated:
        secret = secrets.token_urlsafe(32)
    urls = {item["url"] for item in items}
    job = await store.create(urls.pop() if len(urls) == 1 else "mixed", items,
                             model=models.pop() if len(models) == 1 else None,
                             webhook_url=url, webhook_secret=secret, metadata=metadata)
    runner = request.app.get(RUNNER)
    if runner is not None:
        runner.wake()
    out = _batch(job)
    if generated:
        out["webhook_secret"] = secret     # shown once; sign-checking needs it
    return web.json_response(out, status=201)


# -- reading ------------------------------------------------------------------------------------

def _batch(job: BatchJob) -> dict[str, Any]:
    meta = dict(job.metadata or {})
    owner = meta.pop(_OWNER, None)
    c = job.counts
    return {"id": job.id, "object": "batch", "endpoint": job.route, "model": job.model,
            "status": _STATUS[job.status], "ferry_status": job.status.value,
            "request_counts": {"total": job.total, "completed": c.get("done", 0),
                               "failed": c.get("failed", 0)},
            "counts": c, "metadata": meta or None, "owner": owner,
            "webhook_url": job.webhook_url, "created_at": int(job.created_at),
            "completed_at": int(job.completed_at) if job.completed_at else None,
            "results_url": f"/v1/batches/{job.id}/results"}


def _visible(request: web.Request, job: BatchJob) -> bool:
    principal = principal_of(request)
    if principal is None or "admin" in principal.scopes:
        return True
    return (job.metadata or {}).get(_OWNER) == principal.id


async def _job(request: web.Request) -> BatchJob:
    job_id = request.match_info["batch_id"]
    job = await _store(request).get(job_id)
    if not _visible(request, job):
        raise FerryError(f"no batch job {job_id!r}", code="batch_not_found", status=404)
    return job


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # 19 digits at most: int() refuses over 4300 and nothing here needs more than 2**63
    if not (raw.isascii() and raw.lstrip("-").isdigit() and len(raw) <= 19) \
            or not lo <= int(raw) <= hi:
        raise InvalidInput(f"{name} must be an integer in [{lo}, {hi}]", param=name)
    return int(raw)


@routes.get("/v1/batches")
async def list_batches(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in {s.value for s in JobStatus}:
        raise InvalidInput(f"status must be one of {[s.value for s in JobStatus]}",
                           param="status")
    jobs, cursor = await _store(request).list(
        status=status, limit=_int_param(request, "limit", 20, 1, 1000),
        cursor=request.query.get("cursor"))
    data = [_batch(j) for j in jobs if _visible(request, j)]
    return web.json_response({"object": "list", "data": data, "next_cursor": cursor,
                              "has_more": cursor is not None})


@routes.get("/v1/batches/{batch_id}")
async def get_batch(request: web.Request) -> web.Response:
    return web.json_response(_batch(await _job(request)))


@routes.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    job = await _job(request)
    return web.json_response(_batch(await _store(request).cancel(job.id)))


@routes.get("/v1/batches/{batch_id}/results")
async def batch_results(request: web.Request) -> web.Response:
    job = await _job(request)
    after = _int_param(request, "after", -1, -1, 10**9)
    limit = _int_param(request, "limit", 1000, 1, 10000)
    items = await _store(request).items(job.id, after=after, limit=limit)
    rows = [{"id": f"{job.id}-{it.idx}", "index": it.idx, "custom_id": it.custom_id,
             "status": it.status.value,
             "response": it.result, "error": it.error} for it in items]
    more = len(items) == limit
    jsonl = request.query.get("format") == "jsonl" or any(
        t in request.headers.get("Accept", "") for t in _JSONL)
    if jsonl:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
        return web.Response(text=text, content_type="application/jsonl")
    return web.json_response({"object": "list", "data": rows, "has_more": more,
                              "next_after": items[-1].idx if more else None})
