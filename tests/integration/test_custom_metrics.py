"""Client-defined metrics (POST /metrics/custom) on a real `ferry serve` with two HTTP workers
and auth required: the value a scrape shows is right whichever worker took each POST and
whichever answers the scrape; the bounds of [custom_metrics] hold; every bad body is a 4xx with
a stable code; only admin credentials write."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import stopped_cleanly, tensor_repo
from tests.integration.secure_daemon import SecureDaemon, admin_and_infer_keys, call, error_code
from tests.integration.worker_conn import on_worker

pytestmark = pytest.mark.timeout(180)

PATH = "/metrics/custom"
CONFIG = ("[auth]\nrequired = true\n[custom_metrics]\nmax_metrics = 4\n"
          "max_series_per_metric = 3\nmax_labels = 2\n")


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
                     extra_config=CONFIG)
    d.keys = d.state(admin_and_infer_keys)
    d.start()
    yield d
    stopped_cleanly(d)


@pytest.fixture
def clean(ferry):
    """No custom metric left by another test."""
    status, _, listed = call(ferry, "GET", PATH, key=ferry.keys["admin"])
    assert status == 200
    for name in {s["name"] for s in listed["data"]}:
        assert call(ferry, "DELETE", f"{PATH}/{name}", key=ferry.keys["admin"])[0] == 200
    return ferry


def post(d, body, **kw):
    return call(d, "POST", PATH, key=d.keys["admin"], body=body, **kw)


def _scrape(d, pid=None, avoid=None) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of one scrape (from a chosen worker)."""
    _, status, text, headers = on_worker(d, pid, "GET", "/metrics", avoid=avoid)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):      # the whole scrape parses
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_values_agree_whichever_worker_posts_or_scrapes(clean):
    d = clean
    key = d.keys["admin"]
    first, status, body, _ = on_worker(d, None, "POST", PATH, {
        "name": "app_jobs", "type": "counter", "value": 2, "labels": {"queue": "q1"},
        "help": "Jobs done."}, key)
    assert status == 200 and body["value"] == 2.0, body
    second, status, body, _ = on_worker(d, None, "POST", PATH, {
        "name": "app_jobs", "type": "counter", "value": 3.5, "labels": {"queue": "q1"}}, key,
        avoid=first)
    assert second != first and status == 200 and body["value"] == 5.5, body
    for pid, value in ((first, 42.5), (second, 7.0)):      # the last set wins, on any worker
        _, status, body, _ = on_worker(d, pid, "POST", PATH, {
            "name": "custom_metric", "value": value, "type": "gauge",
            "labels": {"environment": "production"}}, key)
        assert status == 200, body
    for pid in (first, second):
        samples = _scrape(d, pid)
        assert samples["app_jobs_total"] == {(("queue", "q1"),): 5.5}
        assert samples["custom_metric"] == {(("environment", "production"),): 7.0}
        assert "ferry_daemon_ready" in samples       # Ferry's own families are still there
    _, _, text, _ = on_worker(d, first, "GET", "/metrics")
    assert "# HELP app_jobs_total Jobs done." in text and "# TYPE app_jobs_total counter" in text
    assert "# TYPE custom_metric gauge" in text


def test_the_documented_example_verbatim(clean):
    status, _, body = post(clean, {"name": "custom_metric", "value": 42.5, "type": "gauge",
                                   "labels": {"environment": "production"}})
    assert status == 200 and body["value"] == 42.5 and body["labels"] == {
        "environment": "production"}
    assert _scrape(clean)["custom_metric"] == {(("environment", "production"),): 42.5}


def test_bounds_on_names_series_and_labels(clean):
    d = clean
    for i in range(4):
        assert post(d, {"name": f"m{i}", "type": "gauge", "value": i})[0] == 200
    status, _, body = post(d, {"name": "m4", "type": "gauge", "value": 1})
    assert (status, error_code(body)) == (429, "metric_limit_exceeded"), body
    for q in ("a", "b"):
        assert post(d, {"name": "m0", "type": "gauge", "value": 1, "labels": {"q": q}})[0] == 200
    status, _, body = post(d, {"name": "m0", "type": "gauge", "value": 1, "labels": {"q": "c"}})
    assert (status, error_code(body)) == (429, "label_cardinality_exceeded"), body
    # An existing series still updates at the bound; a removed name frees its slot.
    assert post(d, {"name": "m0", "type": "gauge", "value": 9, "labels": {"q": "a"}})[2][
        "value"] == 9
    status, _, body = call(d, "DELETE", f"{PATH}/m3", key=d.keys["admin"])
    assert status == 200 and body["series_removed"] == 1
    assert post(d, {"name": "m4", "type": "gauge", "value": 1})[0] == 200
    samples = _scrape(d)
    assert "m3" not in samples and samples["m4"] == {(): 1.0}
    assert len(samples["m0"]) == 3
    status, _, body = post(d, {"name": "m1", "type": "gauge", "value": 1,
                               "labels": {"a": "1", "b": "2", "c": "3"}})
    assert (status, error_code(body)) == (400, "too_many_labels"), body


@pytest.mark.parametrize("body,status,code", [
    ({"value": 1, "type": "gauge"}, 400, "missing_parameter"),
    ({"name": "x", "type": "gauge"}, 400, "missing_parameter"),
    ({"name": "x", "value": 1}, 400, "missing_parameter"),
    ({"name": "x", "value": 1, "type": "histogram"}, 400, "invalid_metric_type"),
    ({"name": "1x", "value": 1, "type": "gauge"}, 400, "invalid_metric_name"),
    ({"name": "a-b", "value": 1, "type": "gauge"}, 400, "invalid_metric_name"),
    ({"name": "__x", "value": 1, "type": "gauge"}, 400, "invalid_metric_name"),
    ({"name": "x" * 201, "value": 1, "type": "gauge"}, 400, "invalid_metric_name"),
    ({"name": 5, "value": 1, "type": "gauge"}, 400, "invalid_metric_name"),
    ({"name": "ferry_requests", "value": 1, "type": "counter"}, 400, "metric_name_reserved"),
    ({"name": "vllm:num_requests_running", "value": 1, "type": "gauge"}, 400,
     "metric_name_reserved"),
    ({"name": "process_cpu_seconds", "value": 1, "type": "gauge"}, 400, "metric_name_reserved"),
    ({"name": "jobs_total", "value": 1, "type": "counter"}, 400, "metric_name_reserved"),
    ({"name": "x", "value": "1", "type": "gauge"}, 400, "invalid_metric_value"),
    ({"name": "x", "value": True, "type": "gauge"}, 400, "invalid_metric_value"),
    ({"name": "x", "value": 1e308 * 10, "type": "gauge"}, 400, "invalid_metric_value"),
    ({"name": "x", "value": -1, "type": "counter"}, 400, "invalid_metric_value"),
    ({"name": "x", "value": 10 ** 400, "type": "gauge"}, 400, "invalid_metric_value"),
    ({"name": "x", "value": -10 ** 400, "type": "counter"}, 400, "invalid_metric_value"),
    ({"name": "x", "value": 1, "type": "gauge", "labels": ["a"]}, 400, "invalid_label"),
    ({"name": "x", "value": 1, "type": "gauge", "labels": {"a": 1}}, 400, "invalid_label"),
    ({"name": "x", "value": 1, "type": "gauge", "labels": {"a-b": "1"}}, 400, "invalid_label"),
    ({"name": "x", "value": 1, "type": "gauge", "labels": {"__name__": "y"}}, 400,
     "invalid_label"),
    ({"name": "x", "value": 1, "type": "gauge", "labels": {"a": "v" * 257}}, 400,
     "invalid_label"),
    ({"name": "x", "value": 1, "type": "gauge", "help": 5}, 400, "invalid_input"),
    ({"name": "x", "value": 1, "type": "gauge", "colour": "red"}, 400, "unknown_parameter"),
    ([1], 400, "invalid_json"),
])
def test_bad_bodies(clean, body, status, code):
    got, _, reply = post(clean, body)
    assert (got, error_code(reply)) == (status, code), reply
    assert call(clean, "GET", PATH, key=clean.keys["admin"])[2]["data"] == []


@pytest.mark.parametrize("raw", [b"", b"{", b'{"name": "x", "value": NaN, "type": "gauge"}',
                                 b'{"name": "x", "value": Infinity, "type": "gauge"}',
                                 b"\xff\xfe"])
def test_malformed_json(clean, raw):
    got, _, reply = post(clean, None, raw=raw, headers={"Content-Type": "application/json"})
    assert got == 400 and error_code(reply) in ("invalid_json", "invalid_metric_value"), reply


def test_a_name_keeps_its_type(clean):
    assert post(clean, {"name": "kind", "type": "gauge", "value": 1})[0] == 200
    status, _, body = post(clean, {"name": "kind", "type": "counter", "value": 1})
    assert (status, error_code(body)) == (409, "metric_type_conflict"), body


def test_only_admin_credentials_write(clean):
    body = {"name": "x", "value": 1, "type": "gauge"}
    assert call(clean, "POST", PATH, body=body)[0] == 401
    status, _, reply = call(clean, "POST", PATH, key=clean.keys["infer"], body=body)
    assert (status, error_code(reply)) == (403, "insufficient_scope")
    assert call(clean, "GET", PATH, key=clean.keys["infer"])[0] == 403
    assert call(clean, "DELETE", f"{PATH}/x", key=clean.keys["infer"])[0] == 403
    status, _, reply = call(clean, "DELETE", f"{PATH}/x", key=clean.keys["admin"])
    assert (status, error_code(reply)) == (404, "metric_not_found")
    assert call(clean, "GET", "/metrics")[0] == 200          # the scrape stays open


def test_label_values_are_escaped_in_the_exposition(clean):
    tricky = 'a "quoted"\nline\\end'
    assert post(clean, {"name": "esc", "type": "gauge", "value": 3,
                        "labels": {"v": tricky}})[0] == 200
    assert _scrape(clean)["esc"] == {(("v", tricky),): 3.0}
