"""Seed 000 (Cinfer, ../shared/seeds/000-cinfer.md): its Python example (model list, then an
image uploaded as the multipart field `image` with the X-Access-Token header) and the admin
routes /api/v1/internal/{auth,system,models,tokens} with the X-Auth-Token a login gives,
against a real daemon with auth required and the digits model."""
from __future__ import annotations

import pytest

from tests.integration.compat_client import stop_cleanly
from tests.integration.conftest import tensor_repo
from tests.integration.forms import Part, multipart
from tests.integration.secure_daemon import SecureDaemon, call
from tests.unit.test_preprocess import digit_png

pytestmark = pytest.mark.timeout(180)

PASSWORD = "cinfer-password-1"


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=1,
                     extra_config="[auth]\nrequired = true\n")

    async def seed(state):
        key = await state.keys.create("cinfer-client", scopes=["infer"])
        await state.users.create("admin", PASSWORD)
        return {"access": key.plaintext}

    d.creds = d.state(seed)
    d.start()
    status, headers, body = call(d, "POST", "/api/v1/internal/auth",
                                 body={"username": "admin", "password": PASSWORD})
    assert status == 200, body
    d.creds["auth"] = headers["X-Auth-Token"]
    assert body["access_token"] == d.creds["auth"]
    yield d
    stop_cleanly(d)


def _access(ferry) -> dict[str, str]:
    return {"X-Access-Token": ferry.creds["access"]}


def _admin(ferry) -> dict[str, str]:
    return {"X-Auth-Token": ferry.creds["auth"]}


def _image():
    from daemon.demo import digits_split
    _, x, _, y = digits_split()
    return digit_png(x[0]), int(y[0])


def test_python_example(ferry):
    # response = requests.get(".../api/v1/models", headers=headers)
    status, _, models = call(ferry, "GET", "/api/v1/models", headers=_access(ferry))
    assert status == 200, models
    assert [m["id"] for m in models["data"]] == ["digits"]
    # files = {'image': open('test_image.jpg', 'rb')}; requests.post(..., files=files)
    png, label = _image()
    body, ctype = multipart([Part("image", png, "test_image.jpg", "image/png")])
    status, _, result = call(ferry, "POST", "/api/v1/inference/digits", raw=body,
                             headers={**_access(ferry), "Content-Type": ctype})
    assert status == 200, result
    assert result["model"] == "digits" and result["model_id"]
    assert result["predictions"][0]["label"] in (str(label), label)
    # the model by its SHA-256 id too
    status, _, again = call(ferry, "POST", f"/api/v1/inference/{result['model_id']}",
                            raw=body, headers={**_access(ferry), "Content-Type": ctype})
    assert status == 200 and again["predictions"] == result["predictions"], again


def test_inference_refusals(ferry):
    png, _ = _image()
    body, ctype = multipart([Part("image", png, "x.png", "image/png")])
    status, _, answer = call(ferry, "POST", "/api/v1/inference/digits", raw=body,
                             headers={"Content-Type": ctype})
    assert status == 401 and answer["error"]["code"] == "missing_credentials", answer
    assert answer["detail"] == answer["error"]["message"]
    status, _, answer = call(ferry, "POST", "/api/v1/inference/nope", raw=body,
                             headers={**_access(ferry), "Content-Type": ctype})
    assert status == 404 and answer["error"]["code"] == "model_not_found", answer
    bad, ctype = multipart([Part("image", b"not an image", "x.png", "image/png")])
    status, _, answer = call(ferry, "POST", "/api/v1/inference/digits", raw=bad,
                             headers={**_access(ferry), "Content-Type": ctype})
    assert status == 400 and answer["detail"], answer
    empty, ctype = multipart([Part("other", b"x")])
    status, _, answer = call(ferry, "POST", "/api/v1/inference/digits", raw=empty,
                             headers={**_access(ferry), "Content-Type": ctype})
    assert status == 400, answer
    status, _, answer = call(ferry, "GET", "/api/v1/models", headers={"X-Access-Token": "nope"})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key", answer


def test_admin_system_and_models(ferry):
    status, _, body = call(ferry, "GET", "/api/v1/internal/system", headers=_admin(ferry))
    assert status == 200, body
    assert body["cpu"]["count"] >= 1 and body["memory"]["total"] > 0 and body["processes"]
    status, _, body = call(ferry, "GET", "/api/v1/internal/models", headers=_admin(ferry))
    assert status == 200 and "digits" in str(body), body
    status, _, body = call(ferry, "GET", "/api/v1/internal/auth", headers=_admin(ferry))
    assert status == 200 and body["id"] == "user:admin" and "admin" in body["scopes"], body


def test_admin_routes_need_the_admin_scope(ferry):
    for method, path in (("GET", "/api/v1/internal/system"), ("GET", "/api/v1/internal/tokens"),
                         ("GET", "/api/v1/internal/models"), ("GET", "/api/v1/internal/auth")):
        status, _, body = call(ferry, method, path, headers=_access(ferry))
        assert status == 403 and body["error"]["code"] == "insufficient_scope", body
        status, _, body = call(ferry, method, path)
        assert status == 401, body


def test_token_lifecycle(ferry):
    admin = _admin(ferry)
    status, _, created = call(ferry, "POST", "/api/v1/internal/tokens", headers=admin,
                              body={"name": "camera-7", "scopes": ["infer"]})
    assert status == 201 and created["api_key"].startswith("fy_"), created
    key_id = created["id"]
    status, _, listed = call(ferry, "GET", "/api/v1/internal/tokens", headers=admin)
    assert status == 200 and key_id in [k["id"] for k in listed["data"]]
    assert call(ferry, "GET", "/api/v1/models",
                headers={"X-Access-Token": created["api_key"]})[0] == 200
    status, _, rotated = call(ferry, "POST", f"/api/v1/internal/tokens/{key_id}/rotate",
                              headers=admin)
    assert status == 200 and rotated["api_key"] != created["api_key"]
    status, _, gone = call(ferry, "DELETE", f"/api/v1/internal/tokens/{key_id}", headers=admin)
    assert status == 200 and gone["revoked_at"], gone
    status, _, answer = call(ferry, "GET", "/api/v1/models",
                             headers={"X-Access-Token": rotated["api_key"]})
    assert status == 401 and answer["error"]["code"] == "key_revoked", answer
    status, _, answer = call(ferry, "GET", "/api/v1/internal/tokens/nope", headers=admin)
    assert status == 404 and answer["detail"], answer
    status, _, answer = call(ferry, "POST", "/api/v1/internal/tokens", headers=admin,
                             body={"scopes": ["infer"]})
    assert status == 400 and answer["error"]["param"] == "name", answer


def test_login_refusals(ferry):
    status, _, body = call(ferry, "POST", "/api/v1/internal/auth",
                           body={"username": "admin", "password": "wrong"})
    assert status == 401 and body["error"]["code"] == "invalid_credentials", body
    status, _, body = call(ferry, "POST", "/api/v1/internal/auth", body={"username": "admin"})
    assert status == 400 and body["error"]["code"] == "missing_parameter", body


def test_prefixed_routes(ferry):
    status, _, body = call(ferry, "GET", "/compat/cinfer/api/v1/internal/system",
                           headers=_admin(ferry))
    assert status == 200 and body["cpu"]["count"] >= 1
