"""Configuration: defaults, the TOML file, documented environment overrides, CLI overrides, and a
ConfigError naming the key for every invalid value."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ENV_OVERRIDES, Config, load_config
from daemon.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

FULL = """
[server]
host = "10.0.0.1"
port = 8001
workers = 3
zmq_bind = "tcp://127.0.0.1:5555"
max_body_mb = 8
request_timeout_s = 30
drain_grace_s = 2.5
cors_origins = ["https://a.example", "https://b.example"]

[paths]
state_dir = "/srv/ferry/state"
runtime_dir = "/run/ferry"
model_repository = "/srv/models"

[engines]
devices = ["cpu"]
restart_backoff_s = [0.1, 1]
threads = 4

[repository]
control_mode = "poll"
poll_interval_s = 0.5
version_policy = "specific:1,3"

[shm]
arena_mb = 64
inline_threshold_kb = 16

[auth]
required = false
jwt_secret_file = "/etc/ferry/jwt"
allow_ips = ["10.0.0.0/8", "::1"]

[logging]
level = "debug"
format = "text"
log_bodies = true
"""


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ferry.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file_and_no_environment():
    cfg = load_config(env={})
    assert cfg == Config()
    assert (cfg.server.host, cfg.server.port, cfg.server.workers) == ("127.0.0.1", 8000, 2)
    assert cfg.engines.devices == ("auto",) and cfg.repository.version_policy == "latest:1"
    assert cfg.runtime_dir == Path("var/run").absolute() and cfg.runtime_dir.is_absolute()
    assert cfg.zmq_endpoint == f"ipc://{Path('var/run').absolute()}/ferry.zmq"
    assert cfg.to_dict()["server"]["port"] == 8000


def test_file_sets_every_section(tmp_path):
    cfg = load_config(_toml(tmp_path, FULL), env={})
    assert cfg.server.host == "10.0.0.1" and cfg.server.port == 8001 and cfg.server.workers == 3
    assert cfg.server.request_timeout_s == 30.0 and isinstance(cfg.server.request_timeout_s, float)
    assert cfg.server.cors_origins == ("https://a.example", "https://b.example")
    assert cfg.zmq_endpoint == "tcp://127.0.0.1:5555"
    assert cfg.model_repository == Path("/srv/models") and cfg.state_dir == Path("/srv/ferry/state")
    assert cfg.engines.devices == ("cpu",) and cfg.engines.restart_backoff_s == (0.1, 1.0)
    assert cfg.engines.threads == 4
    assert (cfg.repository.control_mode, cfg.repository.poll_interval_s,
            cfg.repository.version_policy) == ("poll", 0.5, "specific:1,3")
    assert (cfg.shm.arena_mb, cfg.shm.inline_threshold_kb) == (64, 16)
    assert cfg.auth.allow_ips == ("10.0.0.0/8", "::1")
    assert cfg.auth.jwt_secret_file == "/etc/ferry/jwt" and cfg.auth.required is False
    assert (cfg.logging.level, cfg.logging.format, cfg.logging.log_bodies) == ("debug", "text",
                                                                              True)


def test_config_is_frozen():
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


# variable: (environment value, attribute path, expected value); the file sets something else
ENV_CASES: dict[str, tuple[str, str, Any]] = {
    "FERRY_HOST": ("0.0.0.0", "server.host", "0.0.0.0"),
    "FERRY_PORT": ("9001", "server.port", 9001),
    "FERRY_WORKERS": ("5", "server.workers", 5),
    "FERRY_STATE_DIR": ("/tmp/st", "paths.state_dir", "/tmp/st"),
    "FERRY_RUNTIME_DIR": ("/tmp/rt", "paths.runtime_dir", "/tmp/rt"),
    "FERRY_MODEL_REPOSITORY": ("/tmp/mr", "paths.model_repository", "/tmp/mr"),
    "FERRY_DEVICES": ("cuda:0, cuda:1,", "engines.devices", ("cuda:0", "cuda:1")),
    "FERRY_CONTROL_MODE": ("explicit", "repository.control_mode", "explicit"),
    "FERRY_LOG_LEVEL": ("warning", "logging.level", "warning"),
    "FERRY_LOG_FORMAT": ("json", "logging.format", "json"),
    "FERRY_AUTH_REQUIRED": ("1", "auth.required", True),
}


def _get(cfg: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def test_every_documented_variable_has_a_case():
    assert set(ENV_CASES) == set(ENV_OVERRIDES)
    assert all(ENV_OVERRIDES[var] == case[1] for var, case in ENV_CASES.items())


@pytest.mark.parametrize("var", sorted(ENV_CASES))
def test_environment_beats_the_file(tmp_path, var):
    value, dotted, want = ENV_CASES[var]
    path = _toml(tmp_path, FULL)
    from_file = _get(load_config(path, env={}), dotted)
    assert from_file != want
    assert _get(load_config(path, env={var: value}), dotted) == want


def test_cli_overrides_beat_the_environment(tmp_path):
    env = {"FERRY_PORT": "9001", "FERRY_LOG_LEVEL": "error"}
    cfg = load_config(_toml(tmp_path, FULL), env=env,
                      overrides={"server.port": 9100, "logging.level": None,
                                 "shm.arena_mb": 32})
    assert cfg.server.port == 9100            # CLI over env over file
    assert cfg.logging.level == "error"       # a flag left unset (None) does not override
    assert cfg.shm.arena_mb == 32


def test_process_environment_is_read_when_none_is_given(monkeypatch):
    for var in ENV_OVERRIDES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FERRY_PORT", "9123")
    monkeypatch.setenv("FERRY_SHM_ARENA_MB", "not even a number")   # not documented: ignored
    cfg = load_config()
    assert cfg.server.port == 9123 and cfg.shm.arena_mb == 256


@pytest.mark.parametrize("text,want", [
    ("1", True), ("true", True), ("YES", True), (" on ", True), ("True", True),
    ("0", False), ("false", False), ("No", False), ("off", False)])
def test_boolean_words(text, want):
    assert load_config(env={"FERRY_AUTH_REQUIRED": text}).auth.required is want


def test_integral_float_is_an_int(tmp_path):
    cfg = load_config(_toml(tmp_path, "[server]\nport = 8080.0\n"), env={})
    assert cfg.server.port == 8080 and isinstance(cfg.server.port, int)


# (how the bad value arrives, the value, the key the error must name)
BAD: list[tuple[str, str, Any, str]] = [
    ("port too big", "server.port", 70000, "server.port"),
    ("port negative", "server.port", -1, "server.port"),
    ("port text", "server.port", "eighty", "server.port"),
    ("port bool", "server.port", True, "server.port"),
    ("port fraction", "server.port", 80.5, "server.port"),
    ("port list", "server.port", [80], "server.port"),
    ("workers zero", "server.workers", 0, "server.workers"),
    ("workers too many", "server.workers", 65, "server.workers"),
    ("host int", "server.host", 5, "server.host"),
    ("cors not list", "server.cors_origins", 5, "server.cors_origins"),
    ("cors of int", "server.cors_origins", [1], "server.cors_origins"),
    ("body zero", "server.max_body_mb", 0, "server.max_body_mb"),
    ("timeout zero", "server.request_timeout_s", 0, "server.request_timeout_s"),
    ("timeout nan", "server.request_timeout_s", "nan", "server.request_timeout_s"),
    ("timeout text", "server.request_timeout_s", "soon", "server.request_timeout_s"),
    ("grace negative", "server.drain_grace_s", -1, "server.drain_grace_s"),
    ("grace bool", "server.drain_grace_s", False, "server.drain_grace_s"),
    ("device name", "engines.devices", ["gpu0"], "engines.devices"),
    ("device cuda text", "engines.devices", "cuda:x", "engines.devices"),
    ("device cuda empty", "engines.devices", "cuda:", "engines.devices"),
    ("device cuda unicode digit", "engines.devices", "cuda:\u00b2", "engines.devices"),
    ("devices empty", "engines.devices", "", "engines.devices"),
    ("backoff text", "engines.restart_backoff_s", ["a"], "engines.restart_backoff_s"),
    ("backoff empty", "engines.restart_backoff_s", [], "engines.restart_backoff_s"),
    ("backoff negative", "engines.restart_backoff_s", [1, -1], "engines.restart_backoff_s"),
    ("threads negative", "engines.threads", -1, "engines.threads"),
    ("standby unknown", "engines.standby", "warm", "engines.standby"),
    ("standby bool", "engines.standby", True, "engines.standby"),
    ("control mode", "repository.control_mode", "sometimes", "repository.control_mode"),
    ("poll zero", "repository.poll_interval_s", 0, "repository.poll_interval_s"),
    ("policy unknown", "repository.version_policy", "newest", "repository.version_policy"),
    ("policy latest 0", "repository.version_policy", "latest:0", "repository.version_policy"),
    ("policy specific text", "repository.version_policy", "specific:a",
     "repository.version_policy"),
    ("arena zero", "shm.arena_mb", 0, "shm.arena_mb"),
    ("arena text", "shm.arena_mb", "big", "shm.arena_mb"),
    ("threshold negative", "shm.inline_threshold_kb", -1, "shm.inline_threshold_kb"),
    ("required word", "auth.required", "maybe", "auth.required"),
    ("required int", "auth.required", 1, "auth.required"),
    ("cidr prefix", "auth.allow_ips", ["10.0.0.0/33"], "auth.allow_ips"),
    ("cidr text", "auth.allow_ips", "localhost", "auth.allow_ips"),
    ("level", "logging.level", "loud", "logging.level"),
    ("format", "logging.format", "xml", "logging.format"),
    ("unknown key", "server.bogus", 1, "server.bogus"),
    ("unknown section", "bogus.key", 1, "bogus"),
    ("key without section", "port", 1, "port"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_invalid_value_names_its_key(case):
    _, dotted, value, key = case
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={dotted: value})
    assert err.value.key == key
    assert str(err.value).startswith(f"config {key}: ")


@pytest.mark.parametrize("text,key", [
    ("[server]\nport = \"x\"\n", "server.port"),
    ("[server]\nworkers = 0\n", "server.workers"),
    ("[nonsense]\na = 1\n", "nonsense"),
    ("[server]\nprot = 80\n", "server.prot"),
    ("server = 5\n", "server"),
    ("[auth]\nrequired = \"perhaps\"\n", "auth.required"),
    ("[auth]\nallow_ips = [\"1.2.3.4/40\"]\n", "auth.allow_ips"),
    ("[engines]\ndevices = [\"tpu\"]\n", "engines.devices"),
    ("[repository]\ncontrol_mode = \"always\"\n", "repository.control_mode"),
    ("[server]\nhost = 1979-05-27\n", "server.host"),
])
def test_invalid_file_value_names_its_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(_toml(tmp_path, text), env={})
    assert err.value.key == key


@pytest.mark.parametrize("var,value", [
    ("FERRY_PORT", "80x"), ("FERRY_WORKERS", "0"), ("FERRY_AUTH_REQUIRED", "2"),
    ("FERRY_DEVICES", "cuda:one"), ("FERRY_CONTROL_MODE", "auto"), ("FERRY_LOG_FORMAT", "yaml")])
def test_invalid_environment_value_names_its_key(var, value):
    with pytest.raises(ConfigError) as err:
        load_config(env={var: value})
    assert err.value.key == ENV_OVERRIDES[var]


def test_valid_cidrs_and_devices_are_accepted():
    cfg = load_config(env={"FERRY_DEVICES": "cpu,cuda:0,cuda:12,auto"},
                      overrides={"auth.allow_ips": ["10.1.2.3/8", "fe80::/10", "127.0.0.1"]})
    assert cfg.engines.devices == ("cpu", "cuda:0", "cuda:12", "auto")
    assert cfg.auth.allow_ips == ("10.1.2.3/8", "fe80::/10", "127.0.0.1")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml", env={})
    assert err.value.key == "--config" and "nope.toml" in str(err.value)


@pytest.mark.parametrize("content", [b"[server\nport = 1\n", b"port = \n", b"[a]\n[a]\n",
                                     b"\xff\xfe[server]\n"],
                         ids=["unclosed table", "no value", "duplicate table", "not utf-8"])
def test_invalid_toml(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.key == "--config" and "invalid TOML" in str(err.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path, env={})
    assert err.value.key == "--config"


@pytest.mark.parametrize("value", ['["  "]', "[3]"])
def test_bad_startup_models_name_the_key(tmp_path, value):
    path = tmp_path / "ferry.toml"
    path.write_text(f"[repository]\nstartup_models = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "repository.startup_models" in str(info.value)
