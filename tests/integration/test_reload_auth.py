"""`systemctl reload` (SIGHUP) applies `[auth]` without a restart: turning keys on, the global
IP allow-list, in both HTTP workers and the ZMQ frontend; a bad file keeps what runs."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from daemon.errors import FerryError
from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytestmark = pytest.mark.timeout(180)

INFER = "/v2/models/digits/infer"
PIXELS = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                      "data": [0.0] * 64}]}


def _reload(d: SecureDaemon, auth: str) -> None:
    d.write_config("[auth]\n" + auth)
    os.kill(d.proc.pid, signal.SIGHUP)


def _everywhere(d: SecureDaemon, key: str | None, status: int) -> bool:
    """20 fresh connections (spread over both workers by SO_REUSEPORT) all answer `status`."""
    return all(call(d, "POST", INFER, key=key, body=PIXELS)[0] == status for _ in range(20))


def _zmq_code(d: SecureDaemon, key: str = "") -> str | None:
    with FerryClient(d.zmq_endpoint, api_key=key, timeout_s=30) as c:
        try:
            c.infer("digits", {"pixels": np.zeros((1, 64), np.float32)})
        except FerryError as exc:
            return exc.code
    return None


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=2,
                     extra_config="[auth]\nrequired = false\n")
    d.prepare()
    d.keys = d.state(lambda state: _key(state))
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


async def _key(state) -> dict[str, str]:
    return {"infer": (await state.keys.create("reload", scopes=["infer"])).plaintext}


def test_sighup_applies_auth_settings_to_every_frontend(ferry):
    key = ferry.keys["infer"]
    assert _everywhere(ferry, None, 200)
    assert _zmq_code(ferry) is None

    _reload(ferry, "required = true\n")
    wait_until(lambda: _everywhere(ferry, None, 401), 20, "keys required in every worker")
    assert error_code(call(ferry, "POST", INFER, body=PIXELS)[2]) == "missing_credentials"
    assert _everywhere(ferry, key, 200)
    assert _zmq_code(ferry) == "missing_credentials"
    assert _zmq_code(ferry, key) is None

    _reload(ferry, 'required = true\nallow_ips = ["10.0.0.0/8"]\n')
    wait_until(lambda: _everywhere(ferry, key, 403), 20, "the allow-list in every worker")
    assert error_code(call(ferry, "POST", INFER, key=key, body=PIXELS)[2]) == "ip_not_allowed"

    # A file that does not load changes nothing: the allow-list stays in force.
    _reload(ferry, 'required = true\nallow_ips = ["not-a-cidr"]\n')
    wait_until(lambda: "reload failed" in ferry.log(), 20, "the refused reload to be logged")
    assert _everywhere(ferry, key, 403)

    _reload(ferry, "required = false\n")
    wait_until(lambda: _everywhere(ferry, None, 200), 20, "keys optional again")
    assert _zmq_code(ferry) is None


def test_reload_names_settings_that_need_a_restart(ferry):
    ferry.server_extra = "max_body_mb = 32\n"
    try:
        _reload(ferry, "required = false\n")
        wait_until(lambda: "server.max_body_mb changed" in ferry.log(), 20,
                   "the restart-only warning")
    finally:
        ferry.server_extra = ""
        _reload(ferry, "required = false\n")
