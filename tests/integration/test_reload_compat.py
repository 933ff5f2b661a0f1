"""`systemctl reload` (SIGHUP) applies `[compat]` and `[tracing]` without a restart, in both HTTP
workers: the seed that `root` mounts at the contested root paths changes (/v1/models, /health,
/models), `text_model` names the model the seed text routes use, `[tracing] enabled = false`
stops spans and traceparent answers, `sample_ratio = 0` leaves new traces unsampled; the log
says each change was applied."""
from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments, wait_until
from tests.integration.secure_daemon import call

pytestmark = pytest.mark.timeout(180)

INFER = "/v2/models/digits/infer"
PIXELS = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                      "data": [0.0] * 64}]}
SUMMARIZE = {"text": "A long text to summarise.", "model": "summarizer", "version": "v1"}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
               extra_config='[compat]\nroot = "api"\n').start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _reload(d: Daemon, extra: str) -> None:
    d.write_config(extra)
    os.kill(d.proc.pid, signal.SIGHUP)


def _models_shape(d: Daemon) -> str:
    status, _, body = call(d, "GET", "/v1/models")
    assert status == 200, body
    if body.get("object") == "list":
        return "openai"
    return "api" if "count" in body and "models" in body else repr(body)


def _health(d: Daemon) -> str:
    status, _, body = call(d, "GET", "/health")
    assert status == 200, body
    if body is None:
        return "vllm"                    # Ferry's probe: 200, no body
    return "backend" if "models_loaded" in body else "api" if body.get("status") else repr(body)


def _traced(d: Daemon) -> bool:
    return _flags(d) is not None


def _flags(d: Daemon) -> str | None:
    """The trace flags a request without a traceparent is answered with (None: no header)."""
    status, headers, body = call(d, "POST", INFER, body=PIXELS)
    assert status == 200, body
    value = {k.lower(): v for k, v in headers.items()}.get("traceparent")
    return value.rsplit("-", 1)[1] if value else None


def _everywhere(d: Daemon, probe, want) -> bool:
    """20 fresh connections (spread over both workers by SO_REUSEPORT) all see `want`."""
    return all(probe(d) == want for _ in range(20))


def test_sighup_changes_the_root_seed_text_model_and_tracing(ferry):
    assert _everywhere(ferry, _models_shape, "api")
    assert _everywhere(ferry, _health, "api")
    assert _everywhere(ferry, _traced, True)
    status, _, body = call(ferry, "POST", "/infer", body=SUMMARIZE)
    # no LLM here and no text_model: the seed says which setting would name one
    assert status == 404 and "[compat] text_model" in body["detail"], body

    _reload(ferry, '[compat]\nroot = "backend"\ntext_model = "absent-llm"\n'
                   '[tracing]\nenabled = false\n')
    wait_until(lambda: _everywhere(ferry, _models_shape, "openai")
               and _everywhere(ferry, _health, "backend"), 30, "[compat] root reloaded")
    status, _, body = call(ferry, "GET", "/models")          # root = "backend": its list
    assert status == 200 and [m["name"] for m in body["models"]] == \
        ["summarizer", "sentiment", "generator"], body
    status, _, body = call(ferry, "POST", "/infer", body=SUMMARIZE)
    assert status == 404 and "absent-llm" in body["detail"], body      # text_model applies
    assert body["success"] is False
    wait_until(lambda: _everywhere(ferry, _traced, False), 30, "[tracing] enabled reloaded")
    log = ferry.log()
    assert "reload: compat.root = 'backend', applied now" in log, log[-3000:]
    assert "reload: tracing.enabled = False, applied now" in log
    assert "compat.root changed; it applies at the next restart" not in log

    assert _everywhere(ferry, _flags, None)

    _reload(ferry, "[tracing]\nsample_ratio = 0\n")        # compat back to its defaults
    wait_until(lambda: _everywhere(ferry, _health, "vllm")
               and _everywhere(ferry, _flags, "00"), 30, "defaults reloaded")
    assert _everywhere(ferry, _models_shape, "openai")
