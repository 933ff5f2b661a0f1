"""Session JWTs: secret file, issue/verify, and every way a token must be refused."""
from __future__ import annotations

import base64
import json
import os
import stat
import time

import jwt
import pytest

from daemon.errors import ConfigError, FerryError, InvalidInput, Unauthorized
from daemon.state.jwt_tokens import JwtIssuer, load_secret

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def issuer(tmp_path):
    return JwtIssuer(load_secret(tmp_path))


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def test_secret_file_is_generated_private_and_stable(tmp_path):
    state_dir = tmp_path / "state"
    secret = load_secret(state_dir)
    path = state_dir / "jwt.secret"
    assert len(secret) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert load_secret(state_dir) == secret
    assert [p.name for p in state_dir.iterdir()] == ["jwt.secret"]  # no temp file left


def test_wide_secret_file_is_tightened_and_malformed_refused(tmp_path):
    load_secret(tmp_path)
    os.chmod(tmp_path / "jwt.secret", 0o644)
    load_secret(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "jwt.secret").st_mode) == 0o600
    (tmp_path / "jwt.secret").write_text("not hex")
    with pytest.raises(FerryError) as err:
        load_secret(tmp_path)
    assert err.value.code == "state_corrupt"


def test_configured_secret(tmp_path):
    assert load_secret(tmp_path, "k" * 32) == b"k" * 32
    assert not (tmp_path / "jwt.secret").exists()
    with pytest.raises(ConfigError) as err:
        load_secret(tmp_path, "too-short")
    assert err.value.key == "auth.jwt_secret"


def test_issue_and_verify(issuer):
    token = issuer.issue("user:alice", ["admin"], token_version=3)
    claims = issuer.verify(token)
    assert claims["sub"] == "user:alice" and claims["scopes"] == ["admin"]
    assert claims["ver"] == 3 and claims["exp"] - claims["iat"] == 900
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_forged_signature(issuer, tmp_path):
    other = JwtIssuer(os.urandom(32))
    with pytest.raises(Unauthorized) as err:
        issuer.verify(other.issue("user:alice", ["admin"]))
    assert err.value.code == "invalid_token" and err.value.status == 401
    # payload swapped under a valid signature: escalate infer -> admin
    token = issuer.issue("svc", ["infer"])
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scopes"] = ["admin"]
    with pytest.raises(Unauthorized) as err:
        issuer.verify(f"{head}.{_b64(claims)}.{sig}")
    assert err.value.code == "invalid_token"


def test_expired(tmp_path):
    secret = load_secret(tmp_path)
    old = JwtIssuer(secret, clock=lambda: time.time() - 2000)
    with pytest.raises(Unauthorized) as err:
        JwtIssuer(secret).verify(old.issue("user:alice", ["admin"], ttl_s=900))
    assert err.value.code == "token_expired"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_alg_none_and_other_algorithms_refused(issuer, tmp_path):
    now = int(time.time())
    claims = {"iss": "ferry", "sub": "user:x", "scopes": ["admin"], "iat": now, "exp": now + 60}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    hs512 = jwt.encode(claims, load_secret(tmp_path), algorithm="HS512")
    for token in (unsigned, hs512):
        with pytest.raises(Unauthorized) as err:
            issuer.verify(token)
        assert err.value.code == "invalid_token"


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "....", "e30.e30.", 123])
def test_malformed(issuer, token):
    with pytest.raises(Unauthorized) as err:
        issuer.verify(token)
    assert err.value.code == "invalid_token"


def test_claims_are_required_and_checked(tmp_path):
    secret = load_secret(tmp_path)
    issuer = JwtIssuer(secret)
    now = int(time.time())
    bad = [
        {"iss": "ferry", "sub": "x", "scopes": ["admin"], "iat": now},             # no exp
        {"iss": "other", "sub": "x", "scopes": ["admin"], "iat": now, "exp": now + 60},
        {"iss": "ferry", "sub": "x", "scopes": ["root"], "iat": now, "exp": now + 60},
        {"iss": "ferry", "sub": "x", "scopes": "admin", "iat": now, "exp": now + 60},
    ]
    for claims in bad:
        with pytest.raises(Unauthorized) as err:
            issuer.verify(jwt.encode(claims, secret, algorithm="HS256"))
        assert err.value.code == "invalid_token", claims


def test_issue_validates(issuer):
    for kwargs, param in (({"scopes": ["root"]}, "scopes"), ({"scopes": []}, "scopes"),
                          ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": 10**9}, "ttl_s")):
        args = {"sub": "x", "scopes": ["admin"], **kwargs}
        with pytest.raises(InvalidInput) as err:
            issuer.issue(args.pop("sub"), args.pop("scopes"), **args)
        assert err.value.param == param
