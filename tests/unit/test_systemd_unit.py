"""systemd units, example config, install.sh and `ferry install-systemd`.

The units are checked by systemd's own tools (systemd-analyze verify and security --offline),
not by string matching alone; systemd need not be PID 1 for either.
"""
from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.config import Config, load_config
from daemon.errors import ConfigError
from daemon.systemd_install import _ferry_program, install

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_analyze = pytest.mark.skipif(not os.access(ANALYZE, os.X_OK),
                                   reason="systemd-analyze is not installed on this host")
MAX_EXPOSURE = 2.0
TEMPLATE_EXEC = "/opt/ferry/venv/bin/ferry serve --config /etc/ferry/ferry.toml"

# Keys the config loader must read (daemon/config.py may add more; the example lists them all).
CONFIG_KEYS = {
    "server": {"host", "port", "workers", "zmq_bind", "max_body_mb", "request_timeout_s",
               "drain_grace_s"},
    "paths": {"state_dir", "runtime_dir", "model_repository"},
    "engines": {"devices", "restart_backoff_s"},
    "repository": {"control_mode", "poll_interval_s"},
    "shm": {"arena_mb", "inline_threshold_kb"},
    "auth": {"required", "jwt_secret_file"},
    "logging": {"level", "format"},
}


def _entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows repeated keys, so no dict."""
    section, out = "", []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _one(entries: list[tuple[str, str, str]], section: str, key: str) -> str:
    values = [v for s, k, v in entries if s == section and k == key]
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "min" else 1)


def _config() -> dict:
    with open(SYSTEMD / "ferry.toml", "rb") as f:
        return tomllib.load(f)


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=30,
                          check=False)


def _exposure(output: str) -> float:
    m = re.search(r"Overall exposure level for ferry\.service: (\d+\.\d+)", output)
    assert m, output[-2000:]
    return float(m[1])


def _stage(folder: Path, *, gpu: bool = False) -> Path:
    """Units as installed, but ExecStart= runs an executable that exists here (verify checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    unit = (SYSTEMD / "ferry.service").read_text()
    assert unit.count(f"ExecStart={TEMPLATE_EXEC}\n") == 1
    (folder / "ferry.service").write_text(
        unit.replace(f"ExecStart={TEMPLATE_EXEC}", f"ExecStart={sys.executable} -c pass"))
    shutil.copy(SYSTEMD / "ferry.socket", folder / "ferry.socket")
    if gpu:
        (folder / "ferry.service.d").mkdir()
        shutil.copy(SYSTEMD / "ferry-gpu.conf", folder / "ferry.service.d" / "gpu.conf")
    return folder


# --- systemd's own checks -------------------------------------------------------------------

@needs_analyze
def test_security_exposure_is_at_most_2() -> None:
    done = _analyze("security", "--offline=yes", str(SYSTEMD / "ferry.service"))
    score = _exposure(done.stdout)
    assert score <= MAX_EXPOSURE, done.stdout
    assert re.search(r"✓ PrivateDevices=", done.stdout)


@needs_analyze
def test_gpu_dropin_is_loaded_opens_only_nvidia_devices_and_stays_under_2(tmp_path) -> None:
    staged = _stage(tmp_path / "units", gpu=True)
    done = _analyze("security", "--offline=yes", str(staged / "ferry.service"))
    assert re.search(r"✗ PrivateDevices=", done.stdout), "the drop-in was not applied"
    acl = next(line for line in done.stdout.splitlines() if "DeviceAllow=" in line)
    for group in ("char-nvidia-frontend:rw", "char-nvidia-uvm:rw", "char-nvidia-caps:r"):
        assert group in acl
    assert _exposure(done.stdout) <= MAX_EXPOSURE


@needs_analyze
@pytest.mark.parametrize("unit, gpu", [("ferry.service", False), ("ferry.service", True),
                                       ("ferry.socket", False)])
def test_systemd_analyze_verify_is_clean(tmp_path, unit, gpu) -> None:
    staged = _stage(tmp_path / "units", gpu=gpu)
    done = _analyze("verify", str(staged / unit))
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr


@needs_analyze
def test_verify_reports_mistakes_so_the_check_above_can_fail(tmp_path) -> None:
    staged = _stage(tmp_path / "units", gpu=True)
    dropin = staged / "ferry.service.d" / "gpu.conf"
    dropin.write_text(dropin.read_text() + "PrivateDevice=no\n")
    done = _analyze("verify", str(staged / "ferry.service"))
    assert "Unknown key 'PrivateDevice'" in done.stderr


# --- what the unit must say -----------------------------------------------------------------

def test_service_lifecycle_settings() -> None:
    unit = _entries(SYSTEMD / "ferry.service")
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ExecStart": TEMPLATE_EXEC,
        "ExecReload": "/bin/kill -HUP $MAINPID", "KillSignal": "SIGTERM", "KillMode": "mixed",
        "WatchdogSec": "30s", "Restart": "on-failure", "RestartSec": "2s",
        "User": "ferry", "Group": "ferry", "RuntimeDirectory": "ferry",
        "StateDirectory": "ferry", "LimitMEMLOCK": "infinity", "LimitNOFILE": "65536",
    }
    assert {k: _one(unit, "Service", k) for k in expected} == expected
    grace = _config()["server"]["drain_grace_s"]
    # Room after the drain for engines to stop before systemd's SIGKILL.
    assert _seconds(_one(unit, "Service", "TimeoutStopSec")) >= grace + 10


def test_service_sandbox_settings() -> None:
    unit = _entries(SYSTEMD / "ferry.service")
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
        "ProtectHostname": "yes", "ProtectProc": "invisible", "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "UMask": "0077",
        # Measured, see the unit's comments: ProcSubset=pid breaks psutil and CPU feature
        # detection; MemoryDenyWriteExecute=yes breaks PyTorch's oneDNN JIT; libzmq aborts a
        # tcp:// bind without AF_NETLINK.
        "ProcSubset": "all", "MemoryDenyWriteExecute": "no",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }
    assert {k: _one(unit, "Service", k) for k in expected} == expected
    filters = [v for s, k, v in unit if k == "SystemCallFilter"]
    assert filters[0] == "@system-service"


def test_unit_directories_match_the_example_config() -> None:
    unit, paths = _entries(SYSTEMD / "ferry.service"), _config()["paths"]
    assert "/run/" + _one(unit, "Service", "RuntimeDirectory") == paths["runtime_dir"]
    assert "/var/lib/" + _one(unit, "Service", "StateDirectory") == paths["state_dir"]
    # ProtectSystem=strict: the default repository must sit in a writable directory.
    assert Path(paths["model_repository"]).is_relative_to(paths["state_dir"])
    zmq_bind = _config()["server"]["zmq_bind"]
    assert zmq_bind.startswith(f"ipc://{paths['runtime_dir']}/")
    assert TEMPLATE_EXEC.endswith("--config /etc/ferry/ferry.toml")


def test_socket_unit_matches_the_example_config() -> None:
    sock, server = _entries(SYSTEMD / "ferry.socket"), _config()["server"]
    assert _one(sock, "Socket", "ListenStream") == f"{server['host']}:{server['port']}"
    assert _one(sock, "Socket", "FileDescriptorName") == "http"
    assert _one(sock, "Socket", "Accept") == "no"
    assert _one(sock, "Socket", "Service") == "ferry.service"


def test_gpu_dropin_flips_private_devices_only_for_nvidia() -> None:
    dropin = _entries(SYSTEMD / "ferry-gpu.conf")
    assert _one(dropin, "Service", "PrivateDevices") == "no"
    assert _one(dropin, "Service", "DevicePolicy") == "closed"
    allowed = [v for s, k, v in dropin if k == "DeviceAllow"]
    assert allowed and all(v.startswith("char-nvidia") for v in allowed)


# --- the example config ---------------------------------------------------------------------

def test_example_config_loads_and_lists_every_loader_key() -> None:
    cfg = load_config(SYSTEMD / "ferry.toml", env={})
    example = _config()
    loader_keys = {section.name: {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
                   for section in dataclasses.fields(Config)}
    assert {section: set(table) for section, table in example.items()} == loader_keys
    for section, keys in CONFIG_KEYS.items():
        assert keys <= loader_keys[section]
    # "every key at its default", except the host layout the unit decides (paths, ipc socket).
    defaults = Config()
    for section, keys in loader_keys.items():
        for key in keys - ({"state_dir", "runtime_dir", "model_repository", "zmq_bind"}):
            assert getattr(getattr(cfg, section), key) == getattr(getattr(defaults, section), key)
    assert cfg.zmq_endpoint == f"ipc://{cfg.paths.runtime_dir}/ferry.zmq"
    assert cfg.server.host == "127.0.0.1"  # secure default: loopback only


def test_example_config_documents_every_key() -> None:
    lines = (SYSTEMD / "ferry.toml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            has_inline = "#" in line.split("=", 1)[1].split('"')[-1]
            has_above = i > 0 and lines[i - 1].startswith("#")
            if not (has_inline or has_above):
                undocumented.append(line)
    assert undocumented == []


# --- install.sh -------------------------------------------------------------------------------

def test_install_sh_parses_with_posix_sh() -> None:
    for shell in ("sh", "dash"):
        if path := shutil.which(shell):
            done = subprocess.run([path, "-n", str(SYSTEMD / "install.sh")],
                                  capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args, rc, text", [
    (["--help"], 0, "usage: install.sh"),
    (["--bogus"], 2, "unknown option: --bogus"),
    (["--prefix"], 2, "usage: install.sh"),
    (["--prefix", "relative/dir"], 2, "--prefix must be an absolute path"),
])
def test_install_sh_options_fail_before_touching_anything(args, rc, text) -> None:
    done = subprocess.run(["sh", str(SYSTEMD / "install.sh"), *args], capture_output=True,
                          text=True, timeout=10, check=False)
    assert done.returncode == rc
    assert text in done.stdout + done.stderr


# --- install() --------------------------------------------------------------------------------

@pytest.fixture
def venv_python(tmp_path) -> Path:
    """A venv-shaped bin/ with an executable `ferry`, so verify can check ExecStart=."""
    bin_dir = tmp_path / "opt" / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "ferry").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "ferry").chmod(0o755)
    return bin_dir / "python"


def _unit_path(root: Path) -> Path:
    return root / "etc/systemd/system/ferry.service"


def test_install_stages_unit_and_config(tmp_path, venv_python) -> None:
    root = tmp_path / "root"
    written = install(root, python=str(venv_python), dry_run=True)
    config = root / "etc/ferry/ferry.toml"
    assert written == [_unit_path(root), config]
    unit = _unit_path(root).read_text()
    ferry = venv_python.parent / "ferry"
    assert f"\nExecStart={ferry} serve --config /etc/ferry/ferry.toml\n" in unit
    assert unit == (SYSTEMD / "ferry.service").read_text().replace(
        "ExecStart=/opt/ferry/venv/bin/ferry ", f"ExecStart={ferry} ")
    assert config.read_text() == (SYSTEMD / "ferry.toml").read_text()
    assert _unit_path(root).stat().st_mode & 0o777 == 0o644
    if os.access(ANALYZE, os.X_OK):
        done = _analyze("verify", str(_unit_path(root)))
        assert done.returncode == 0 and done.stderr == "", done.stderr


def test_install_keeps_an_existing_config_and_replaces_the_unit(tmp_path, venv_python) -> None:
    root = tmp_path / "root"
    config = root / "etc/ferry/ferry.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[server]\nport = 9000\n")
    _unit_path(root).parent.mkdir(parents=True)
    _unit_path(root).write_text("[Service]\nExecStart=/old\n")
    written = install(root, python=str(venv_python), dry_run=True)
    assert written == [_unit_path(root)]
    assert config.read_text() == "[server]\nport = 9000\n"
    assert "ExecStart=/old" not in _unit_path(root).read_text()


def test_install_user_gpu_and_socket(tmp_path, venv_python) -> None:
    root = tmp_path / "root"
    written = install(root, user="inference", python=str(venv_python), gpu=True, socket=True,
                      dry_run=True)
    units = root / "etc/systemd/system"
    assert written == [units / "ferry.service", units / "ferry.service.d/gpu.conf",
                       units / "ferry.socket", root / "etc/ferry/ferry.toml"]
    entries = _entries(units / "ferry.service")
    assert (_one(entries, "Service", "User"), _one(entries, "Service", "Group")) == \
        ("inference", "inference")
    assert (units / "ferry.service.d/gpu.conf").read_text() == \
        (SYSTEMD / "ferry-gpu.conf").read_text()
    assert (units / "ferry.socket").read_text() == (SYSTEMD / "ferry.socket").read_text()


def test_install_under_a_staging_root_never_creates_the_user(tmp_path, venv_python) -> None:
    user = "ferrystagetest"
    install(tmp_path / "root", user=user, python=str(venv_python), dry_run=False)
    with pytest.raises(KeyError):
        pwd.getpwnam(user)


def test_dry_run_on_the_live_root_writes_nothing(venv_python) -> None:
    unit = Path("/etc/systemd/system/ferry.service")
    if unit.exists():
        pytest.skip("ferry is installed on this host; not touching it")
    user = "ferrydrytest"
    written = install(Path("/"), user=user, python=str(venv_python), dry_run=True)
    assert written[0] == unit
    assert not unit.exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(user)


@pytest.mark.parametrize("kwargs, key, message", [
    ({"user": "root"}, "user", "refusing to run Ferry as root"),
    ({"user": "Bad User"}, "user", "not a valid system user name"),
    ({"user": ""}, "user", "not a valid system user name"),
    ({"python": "venv/bin/python"}, "python", "must be an absolute path"),
    ({"python": "/opt/my ferry/bin/python"}, "python", "characters systemd would interpret"),
    ({"python": "/opt/%h/bin/python"}, "python", "characters systemd would interpret"),
    ({"templates": Path("/nonexistent/systemd")}, "templates", "cannot read"),
])
def test_install_rejects_bad_options_and_writes_nothing(tmp_path, venv_python, kwargs, key,
                                                       message) -> None:
    root = tmp_path / "root"
    kwargs = {"python": str(venv_python), **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        install(root, dry_run=True, **kwargs)
    assert err.value.key == key
    assert not root.exists()


def test_live_install_requires_the_ferry_script(tmp_path) -> None:
    with pytest.raises(ConfigError, match="pip install ferry into that environment") as err:
        _ferry_program(str(tmp_path / "bin" / "python"), must_exist=True)
    assert err.value.key == "python"


def test_cli_stages_files_and_reports_bad_options(tmp_path, venv_python) -> None:
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "daemon.systemd_install", "--root", str(root),
           "--python", str(venv_python), "--gpu", "--socket"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [Path(p) for p in done.stdout.split()] == [
        _unit_path(root), root / "etc/systemd/system/ferry.service.d/gpu.conf",
        root / "etc/systemd/system/ferry.socket", root / "etc/ferry/ferry.toml"]
    done = subprocess.run([*cmd, "--user", "root"], cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 2
    assert "config user: refusing to run Ferry as root" in done.stderr
