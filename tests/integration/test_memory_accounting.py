"""A model that does not fit its engine's memory budget is refused, not loaded into an OOM."""
from __future__ import annotations

import json
import urllib.request

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get


def test_model_over_budget_is_refused_and_the_rest_serves(demo_models, tmp_path_factory):
    # digits (~50 KiB) fits in 8 MiB; minilm (~90 MB of ONNX) does not.
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits", "minilm")), workers=1,
               extra_config="[engines]\nmemory_mb = 8\n"
               '[repository]\ncontrol_mode = "explicit"\n').start()    # explicit: loads allowed
    try:
        code, ready = http_get(d.url + "/readyz")
        assert code == 200 and ready["models"]["digits"] == {"1": "ready"}
        assert ready["models"]["minilm"] == {"1": "failed"}
        req = urllib.request.Request(d.url + "/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req) as resp:
            index = {r["name"]: r for r in json.loads(resp.read())}
        assert index["minilm"]["state"] == "FAILED"
        assert "insufficient" in index["minilm"]["reason"] or "MiB" in index["minilm"]["reason"]
        code, err = http_get(d.url + "/v2/models/minilm")
        assert code == 503 and err["code"] == "model_unavailable"
        # the explicit load API gives the clear error too
        req = urllib.request.Request(d.url + "/v2/repository/models/minilm/load", data=b"{}",
                                     method="POST")
        try:
            urllib.request.urlopen(req)
            raise AssertionError("load over budget succeeded")
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
            assert exc.code == 507 and body["code"] == "insufficient_memory", body
            assert "MiB" in body["message"]
    finally:
        assert d.stop() == 0
