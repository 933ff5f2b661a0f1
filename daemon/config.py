"""The configuration tree: loaded once (TOML file, then environment overrides, then CLI flags).

Environment overrides (the documented list; nothing else is read from the environment):

    FERRY_HOST, FERRY_PORT, FERRY_WORKERS          server.host / port / workers
    FERRY_STATE_DIR, FERRY_RUNTIME_DIR             paths.state_dir / runtime_dir
    FERRY_MODEL_REPOSITORY                         paths.model_repository
    FERRY_DEVICES                                  engines.devices (comma separated)
    FERRY_CONTROL_MODE                             repository.control_mode
    FERRY_LOG_LEVEL, FERRY_LOG_FORMAT              logging.level / format
    FERRY_AUTH_REQUIRED                            auth.required (1/0, true/false)

Defaults are embedded so `ferry serve` runs with no file at all (state under ./var).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from daemon.errors import ConfigError
from daemon.repository import select_versions

__all__ = ["ServerConfig", "PathsConfig", "EnginesConfig", "RepositoryConfig", "ShmConfig",
           "AuthConfig", "LoggingConfig", "CompatConfig", "COMPAT_SEEDS", "TemplatesConfig",
           "CustomMetricsConfig", "TracingConfig", "Config",
           "load_config", "check_exposure", "ENV_OVERRIDES"]


@dataclass(slots=True, frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    zmq_bind: str = ""              # "" → ipc://<runtime_dir>/ferry.zmq
    max_body_mb: int = 64
    request_timeout_s: float = 300.0
    # Slow clients: a connection must send a complete request head within header_timeout_s of
    # opening (or of its last response, which also closes idle keep-alive connections), and a
    # body within body_timeout_s of its head; a worker holds at most max_connections at once.
    header_timeout_s: float = 30.0
    body_timeout_s: float = 120.0
    max_connections: int = 512
    drain_grace_s: float = 30.0
    cors_origins: tuple[str, ...] = ()
    # Load shedding (0: off): a generation that would make more than max_waiting requests wait
    # in an engine's queue, or join a queue whose oldest request has waited max_queue_wait_s,
    # gets 429 overloaded + Retry-After before it costs anything (frontends/load_shed.py).
    max_waiting: int = 0
    max_queue_wait_s: float = 0.0
    # Resumable streams (stream_options.resumable): how long a dropped stream waits for its
    # client to come back (0: resumable streams refused), and the bytes of retained events a
    # key may hold (frontends/http/resume.py).
    stream_resume_window_s: float = 60.0
    stream_resume_max_kb_per_key: int = 8192


@dataclass(slots=True, frozen=True)
class PathsConfig:
    state_dir: str = "var/state"
    runtime_dir: str = "var/run"
    model_repository: str = "var/models"


@dataclass(slots=True, frozen=True)
class EnginesConfig:
    devices: tuple[str, ...] = ("auto",)
    restart_backoff_s: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
    threads: int = 0                # torch threads per engine; 0 = usable CPUs less one
    memory_mb: int = 0              # model memory budget per engine; 0 = from the device
    standby: str = "off"            # off | imports | models: a waiting engine process per device


@dataclass(slots=True, frozen=True)
class RepositoryConfig:
    control_mode: str = "none"      # none | poll | explicit
    poll_interval_s: float = 5.0
    version_policy: str = "latest:1"   # latest:N | all | specific:1,3
    # explicit mode: the models loaded at start (names or fnmatch patterns; Triton's
    # --load-model). ["*"]: everything; []: nothing until a load request.
    startup_models: tuple[str, ...] = ("*",)


@dataclass(slots=True, frozen=True)
class ShmConfig:
    arena_mb: int = 256
    inline_threshold_kb: int = 64
    max_regions: int = 64          # client regions registered at once (each maps in every process)


@dataclass(slots=True, frozen=True)
class AuthConfig:
    required: bool = False
    jwt_secret_file: str = ""
    allow_ips: tuple[str, ...] = ()
    webhook_allow_cidrs: tuple[str, ...] = ()   # private networks batch webhooks may reach


@dataclass(slots=True, frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"            # json | text
    log_bodies: bool = False


COMPAT_SEEDS = ("cinfer", "backend", "api", "gateway", "inferno")


@dataclass(slots=True, frozen=True)
class CompatConfig:
    # The seed whose routes answer, at the root, the paths several claim (GET /health, /models,
    # POST /infer by body shape first; "api": /v1/models too). "": Ferry's own routes keep
    # theirs. Every seed is also served under /compat/<seed>/ (frontends/http/compat).
    root: str = ""
    # The LLM the text seeds (backend, gateway, inferno without "model") generate with;
    # "": the first ready LLM by name.
    text_model: str = ""


@dataclass(slots=True, frozen=True)
class TemplatesConfig:
    """Prompt templates (frontends/http/prompt_templates.py, template_sandbox.py)."""
    max_source_chars: int = 32768
    max_output_chars: int = 65536
    max_variables_chars: int = 262144
    max_steps: int = 1_000_000
    render_timeout_s: float = 1.0


@dataclass(slots=True, frozen=True)
class CustomMetricsConfig:
    """Client-defined metrics (frontends/http/custom_metrics.py)."""
    max_metrics: int = 100
    max_series_per_metric: int = 100
    max_labels: int = 8


@dataclass(slots=True, frozen=True)
class TracingConfig:
    """Request spans (frontends/spans.py): the newest buffer_spans are kept."""
    enabled: bool = True            # false: no spans, no traceparent answered, none on the wire
    sample_ratio: float = 1.0       # share of new traces recorded (a traceparent decides its own)
    buffer_spans: int = 2048
    otlp_endpoint: str = ""         # "": no export; else http(s)://host:4318 (OTLP/HTTP)


@dataclass(slots=True, frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    shm: ShmConfig = field(default_factory=ShmConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    custom_metrics: CustomMetricsConfig = field(default_factory=CustomMetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.paths.runtime_dir).absolute()

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir).absolute()

    @property
    def model_repository(self) -> Path:
        return Path(self.paths.model_repository).absolute()

    @property
    def zmq_endpoint(self) -> str:
        return self.server.zmq_bind or f"ipc://{self.runtime_dir}/ferry.zmq"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ENV_OVERRIDES: dict[str, str] = {
    "FERRY_HOST": "server.host",
    "FERRY_PORT": "server.port",
    "FERRY_WORKERS": "server.workers",
    "FERRY_STATE_DIR": "paths.state_dir",
    "FERRY_RUNTIME_DIR": "paths.runtime_dir",
    "FERRY_MODEL_REPOSITORY": "paths.model_repository",
    "FERRY_DEVICES": "engines.devices",
    "FERRY_CONTROL_MODE": "repository.control_mode",
    "FERRY_LOG_LEVEL": "logging.level",
    "FERRY_LOG_FORMAT": "logging.format",
    "FERRY_AUTH_REQUIRED": "auth.required",
}

_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert `value` to the type of the field's default, naming `key` on failure."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            elem = default[0] if default else ""
            return tuple(_coerce(key, v.strip() if isinstance(v, str) else v, elem)
                         for v in items if v != "")
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected {type(default).__name__}, got {value!r}") from None
    return value


def _apply(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    tree.setdefault(section, {})[name] = value


def _build(tree: Mapping[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for sname, values in tree.items():
        if sname not in _SECTIONS:
            raise ConfigError(sname, "unknown section")
        if not isinstance(values, Mapping):
            raise ConfigError(sname, "must be a table")
        cls = type(getattr(Config(), sname))
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in values.items():
            if k not in known:
                raise ConfigError(f"{sname}.{k}", "unknown key")
            kwargs[k] = _coerce(f"{sname}.{k}", v, getattr(defaults, k))
        sections[sname] = cls(**kwargs)
    cfg = Config(**sections)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise ConfigError("server.port", f"must be 0..65535, got {s.port}")
    if not 1 <= s.workers <= 64:
        raise ConfigError("server.workers", f"must be 1..64, got {s.workers}")
    if s.max_body_mb < 1:
        raise ConfigError("server.max_body_mb", "must be at least 1")
    if not s.drain_grace_s >= 0:   # written so that nan fails too
        raise ConfigError("server.drain_grace_s", "must be >= 0")
    if not s.request_timeout_s > 0:
        raise ConfigError("server.request_timeout_s", "must be > 0")
    for key in ("header_timeout_s", "body_timeout_s"):
        if not getattr(s, key) > 0:
            raise ConfigError(f"server.{key}", "must be > 0")
    if s.max_connections < 1:
        raise ConfigError("server.max_connections", "must be at least 1")
    if not 0 <= s.stream_resume_window_s <= 86400:   # written so that nan fails too
        raise ConfigError("server.stream_resume_window_s", "must be 0 (off) .. 86400 seconds")
    if not 1 <= s.stream_resume_max_kb_per_key <= 1 << 22:
        raise ConfigError("server.stream_resume_max_kb_per_key", "must be 1 .. 4194304 (4 GiB)")
    if not 0 <= s.max_waiting <= 1_000_000:
        raise ConfigError("server.max_waiting", "must be 0 (off) .. 1000000")
    if not 0 <= s.max_queue_wait_s <= 86400:   # written so that nan fails too
        raise ConfigError("server.max_queue_wait_s", "must be 0 (off) .. 86400 seconds")
    if cfg.engines.threads < 0:
        raise ConfigError("engines.threads", "must be >= 0 (0: the usable CPUs less one)")
    if not cfg.engines.restart_backoff_s or not all(b >= 0 for b in cfg.engines.restart_backoff_s):
        raise ConfigError("engines.restart_backoff_s", "must be a non-empty list of seconds >= 0")
    if cfg.shm.inline_threshold_kb < 0:
        raise ConfigError("shm.inline_threshold_kb", "must be >= 0")
    if cfg.engines.standby not in ("off", "imports", "models"):
        raise ConfigError("engines.standby", "must be \"off\", \"imports\" or \"models\"")
    if cfg.engines.memory_mb < 0:
        raise ConfigError("engines.memory_mb", "must be >= 0 (0: sized from the device)")
    if cfg.repository.control_mode not in ("none", "poll", "explicit"):
        raise ConfigError("repository.control_mode", "must be none, poll or explicit")
    if not cfg.repository.poll_interval_s > 0:
        raise ConfigError("repository.poll_interval_s", "must be > 0")
    # a bad policy must stop `ferry serve` at start, not the first repository scan
    select_versions({}, cfg.repository.version_policy)
    if any(not isinstance(m, str) or not m for m in cfg.repository.startup_models):
        raise ConfigError("repository.startup_models", "must be a list of model names or "
                          "patterns (\"*\" for all)")
    if cfg.shm.arena_mb < 1:
        raise ConfigError("shm.arena_mb", "must be at least 1")
    if not 0 <= cfg.shm.max_regions <= 4096:
        raise ConfigError("shm.max_regions", "must be between 0 and 4096")
    if cfg.logging.level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError("logging.level", "must be debug, info, warning, error or critical")
    if cfg.logging.format not in ("json", "text"):
        raise ConfigError("logging.format", "must be json or text")
    for key in ("max_source_chars", "max_output_chars", "max_variables_chars", "max_steps"):
        if not 1 <= getattr(cfg.templates, key) <= 2**31:
            raise ConfigError(f"templates.{key}", "must be 1 .. 2**31")
    if not 0 < cfg.templates.render_timeout_s <= 60:
        raise ConfigError("templates.render_timeout_s", "must be > 0 and at most 60 seconds")
    for key in ("max_metrics", "max_series_per_metric", "max_labels"):
        if not 1 <= getattr(cfg.custom_metrics, key) <= 100000:
            raise ConfigError(f"custom_metrics.{key}", "must be 1 .. 100000")
    if not 0 <= cfg.tracing.sample_ratio <= 1:      # written so that nan fails too
        raise ConfigError("tracing.sample_ratio", "must be 0 .. 1")
    if not 1 <= cfg.tracing.buffer_spans <= 1_000_000:
        raise ConfigError("tracing.buffer_spans", "must be 1 .. 1000000")
    if cfg.tracing.otlp_endpoint and not cfg.tracing.otlp_endpoint.startswith(
            ("http://", "https://")):
        raise ConfigError("tracing.otlp_endpoint", "must be \"\" (off) or an http:// or "
                          "https:// URL of an OTLP/HTTP collector")
    if not cfg.engines.devices:
        raise ConfigError("engines.devices", "must name at least one device")
    for dev in cfg.engines.devices:
        if dev not in ("auto", "cpu") and not (dev.startswith("cuda:") and dev[5:].isascii()
                                             and dev[5:].isdigit()):
            raise ConfigError("engines.devices", f"unknown device {dev!r} (auto, cpu, cuda:N)")
    if cfg.compat.root not in ("", *COMPAT_SEEDS):
        raise ConfigError("compat.root", f"must be \"\" or one of {', '.join(COMPAT_SEEDS)}")
    for key in ("allow_ips", "webhook_allow_cidrs"):
        for cidr in getattr(cfg.auth, key):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"auth.{key}", f"not a CIDR: {cidr!r}") from None


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """File, then environment, then `overrides` ({"server.port": 9000} from CLI flags)."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("--config", f"invalid TOML in {path}: {exc}") from None
        except OSError as exc:   # a directory, no permission
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        for sname, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(sname, "must be a table")
            tree[sname] = dict(values)
    env = os.environ if env is None else env
    for var, key in ENV_OVERRIDES.items():
        if var in env:
            _apply(tree, key, env[var])
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply(tree, key, value)
    return _build(tree)


def check_exposure(cfg: Config) -> None:
    """Refuse to expose the daemon beyond loopback without authentication (at start, and for a
    reload that would turn authentication off)."""
    host = cfg.server.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not cfg.auth.required:
        raise ConfigError("server.host", (
            f"binding {host} exposes the daemon beyond this host; set [auth] required = true "
            "and create a key first: ferry tokens create --name NAME --scopes infer"))
