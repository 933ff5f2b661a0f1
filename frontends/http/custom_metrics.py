"""Client-defined metrics (seed 004, Inferno's `POST /metrics/custom`), exported on `/metrics`.

    POST   /metrics/custom          {"name", "value", "type": "gauge"|"counter", "labels"?,
                                     "help"?}  -> 200 the series after the update
    GET    /metrics/custom          every custom series
    DELETE /metrics/custom/{name}   every series of a name (frees its slots)

A gauge is set to `value`; a counter is increased by `value` (>= 0), as Prometheus counters
only go up (a counter `name` is exported as `name_total`). The series live in the state
database (daemon/state/custom_metrics.py), so the value is right whichever HTTP worker took the
POST and whichever answers the scrape. The routes need the `admin` scope, whatever
`auth.required` says (frontends/http/security.py): a metric is exported to every scraper, so
writing one is an operator's act, not an inference right.

Rules, each refusal a 4xx with a stable code: names follow Prometheus
(`[a-zA-Z_:][a-zA-Z0-9_:]*`, at most 200 characters) and may not take Ferry's own prefixes
(`ferry_`, `vllm:`, `vllm_`, `process_`, `python_`) or a suffix the exposition adds (`_total`,
`_created`, `_bucket`, `_count`, `_sum`, `_info`) -> 400 invalid_metric_name /
metric_name_reserved; label names `[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed, values strings of
at most 256 characters -> 400 invalid_label; at most `custom_metrics.max_labels` labels -> 400
too_many_labels; a finite number value -> 400 invalid_metric_value; a name keeps its first type
-> 409 metric_type_conflict; at most `max_metrics` names and `max_series_per_metric` label
combinations per name -> 429 metric_limit_exceeded / label_cardinality_exceeded.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client.core import Metric

from daemon.errors import FerryError, InvalidInput
from daemon.state.custom_metrics import CustomMetricStore, MetricBounds, Series
from frontends.http.appkeys import ACCESS, DISPATCHER
from frontends.http.json_body import decode_json

__all__ = ["routes", "setup", "configure", "custom_families", "Bounds"]

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}")
_RESERVED_PREFIXES = ("ferry_", "vllm:", "vllm_", "process_", "python_")
_RESERVED_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info")
_FIELDS = {"name", "value", "type", "labels", "help"}
_KINDS = ("gauge", "counter")
_LABEL_VALUE_MAX = 256
_HELP_MAX = 256
_DEFAULT_HELP = "Client-defined metric (POST /metrics/custom)."


@dataclass(slots=True)
class Bounds:
    """The `[custom_metrics]` limits; mutable so a reload applies in place."""

    max_metrics: int = 100
    max_series_per_metric: int = 100
    max_labels: int = 8


BOUNDS: web.AppKey[Bounds] = web.AppKey("custom_metric_bounds", Bounds)


def setup(app: web.Application) -> None:
    app[BOUNDS] = Bounds()
    app.add_routes(routes)
    if DISPATCHER in app:   # the limits arrive with the placement config (and on SIGHUP)
        dispatcher = app[DISPATCHER]
        dispatcher.config_listeners.append(lambda config: configure(app, config))
        if dispatcher.placement is not None:
            configure(app, dispatcher.placement.config)


def configure(app: web.Application, config: dict[str, Any]) -> None:
    section = config.get("custom_metrics") or {}
    bounds = app[BOUNDS]
    for key in ("max_metrics", "max_series_per_metric", "max_labels"):
        if isinstance(section.get(key), int):
            setattr(bounds, key, section[key])


def _store(app: web.Application) -> CustomMetricStore | None:
    access = app.get(ACCESS)
    return CustomMetricStore(access.state.db) if access is not None else None


# -- validation ---------------------------------------------------------------------------------

def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.startswith("__"):
        raise InvalidInput("'name' must be a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, "
                           "at most 200 characters, not starting with '__')",
                           code="invalid_metric_name", param="name")
    if value.startswith(_RESERVED_PREFIXES) or value.endswith(_RESERVED_SUFFIXES):
        raise InvalidInput(f"metric names may not start with {list(_RESERVED_PREFIXES)} "
                           f"(Ferry's own metrics) nor end with {list(_RESERVED_SUFFIXES)} "
                           "(the exposition adds those)", code="metric_name_reserved",
                           param="name")
    return value


def _labels(value: object, bounds: Bounds) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput("'labels' must be an object of strings", code="invalid_label",
                           param="labels")
    if len(value) > bounds.max_labels:
        raise InvalidInput(f"{len(value)} labels; at most {bounds.max_labels} "
                           "(custom_metrics.max_labels)", code="too_many_labels",
                           param="labels")
    for k, v in value.items():
        if not _LABEL.fullmatch(k) or k.startswith("__"):
            raise InvalidInput(f"label name {k[:100]!r} must match [a-zA-Z_][a-zA-Z0-9_]* "
                               "(at most 100 characters, not starting with '__')",
                               code="invalid_label", param=f"labels.{k[:100]}")
        if not isinstance(v, str) or len(v) > _LABEL_VALUE_MAX:
            raise InvalidInput(f"label {k!r}: the value must be a string of at most "
                               f"{_LABEL_VALUE_MAX} characters", code="invalid_label",
                               param=f"labels.{k}")
    return dict(value)


def _value(value: object, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or abs(value) > 1e300 or not math.isfinite(value):   # no float() of a huge int
        raise InvalidInput("'value' must be a finite number", code="invalid_metric_value",
                           param="value")
    if kind == "counter" and value < 0:
        raise InvalidInput("a counter only goes up: 'value' is the increment, >= 0",
                           code="invalid_metric_value", param="value")
    return float(value)


def _parse(body: object, bounds: Bounds) -> tuple[str, str, dict[str, str], float, str]:
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object", code="invalid_json")
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {sorted(unknown)}; expected {sorted(_FIELDS)}",
                           code="unknown_parameter", param=sorted(unknown)[0])
    for field in ("name", "value", "type"):
        if body.get(field) is None:
            raise InvalidInput(f"'{field}' is required", code="missing_parameter", param=field)
    kind = body["type"]
    if kind not in _KINDS:
        raise InvalidInput("'type' must be \"gauge\" or \"counter\"",
                           code="invalid_metric_type", param="type")
    help_text = body.get("help", _DEFAULT_HELP)
    if not isinstance(help_text, str) or len(help_text) > _HELP_MAX:
        raise InvalidInput(f"'help' must be a string of at most {_HELP_MAX} characters",
                           param="help")
    return (_name(body["name"]), kind, _labels(body.get("labels"), bounds),
            _value(body["value"], kind), help_text or _DEFAULT_HELP)


# -- routes -------------------------------------------------------------------------------------

def _need_store(request: web.Request) -> CustomMetricStore:
    store = _store(request.app)
    if store is None:
        raise FerryError("the state database is not open", code="security_unavailable",
                         status=503)
    return store


@routes.post("/metrics/custom")
async def post_metric(request: web.Request) -> web.Response:
    bounds = request.app[BOUNDS]
    raw = await request.read()
    name, kind, labels, value, help_text = _parse(decode_json(raw) if raw else None, bounds)
    series = await _need_store(request).record(
        name, kind, labels, value, help_text,
        MetricBounds(bounds.max_metrics, bounds.max_series_per_metric))
    return web.json_response({"status": "recorded", **series.to_dict()})


@routes.get("/metrics/custom")
async def list_metrics(request: web.Request) -> web.Response:
    series = await _need_store(request).all()
    return web.json_response({"object": "list", "data": [s.to_dict() for s in series]})


@routes.delete("/metrics/custom/{name}")
async def delete_metric(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    removed = await _need_store(request).delete(name)
    return web.json_response({"name": name, "deleted": True, "series_removed": removed})


# -- the scrape ---------------------------------------------------------------------------------

def families(series: list[Series]) -> list[Metric]:
    out: dict[str, Metric] = {}
    for s in series:
        fam = out.get(s.name)
        if fam is None:
            fam = out[s.name] = Metric(s.name, s.help, s.kind)
        fam.add_sample(s.name + ("_total" if s.kind == "counter" else ""), s.labels, s.value)
    return list(out.values())


async def custom_families(app: web.Application) -> list[Metric]:
    """The custom series as metric families for `/metrics` ([] without the state database)."""
    store = _store(app)
    if store is None:
        return []
    try:
        return families(await store.all())
    except FerryError as exc:    # a busy database must not fail the whole scrape
        log.warning("custom metrics left out of this scrape: %s", exc.message)
        return []
