"""`ferry serve`: the supervisor. Starts engines and frontends, loads models, publishes
placement, restarts what dies, tells systemd how it is going, and drains on SIGTERM.

It never sits on the data path: frontends talk to engines directly.
"""
from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import os
import secrets
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from daemon import metrics
from daemon import protocol as P
from daemon.children import (Child, backoff_for, reap, spawn, spawn_standby, stop_all,
                             take_over)
from daemon.config import Config, check_exposure, load_config
from daemon.control import handle_control
from daemon.devices import discover_devices
from daemon.errors import FerryError, InvalidInput
from daemon.memory import MemoryLedger, device_budget, estimate_bytes
from daemon.model_version import ModelVersion
from daemon.notify import Notifier
from daemon.replies import PendingReplies
from daemon.repository import fingerprint, scan, select_versions
from daemon.repository_spec import load_spec
from daemon.shm import reclaim, reclaim_orphans

__all__ = ["Supervisor", "ModelVersion"]

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.instance = secrets.token_hex(3)
        self.rt = cfg.runtime_dir
        self.ctx = zmq.asyncio.Context()
        self.engines: dict[str, Child] = {}
        self.frontends: dict[str, Child] = {}
        self.standbys: dict[str, Child] = {}     # engine id → its waiting standby process
        self.models: dict[tuple[str, int], ModelVersion] = {}
        self.regions: dict[str, dict[str, Any]] = {}
        self.epoch = 0
        self.state = "starting"
        self.log_level = cfg.logging.level      # changed at run time by /v2/logging
        # unset: children must not inherit NOTIFY_SOCKET (only the main process may notify).
        self.notifier = Notifier.from_env(unset=True)
        self.stop_event = asyncio.Event()
        self.reload_event = asyncio.Event()
        self.frontends_ready: set[str] = set()
        self._links: dict[str, zmq.asyncio.Socket] = {}
        self._replies = PendingReplies()      # engine calls waiting for their reply
        self._pub: zmq.asyncio.Socket | None = None
        self.repository_lock = asyncio.Lock()     # loads, unloads and repository scans

    # -- endpoints ---------------------------------------------------------------------------
    def _ipc(self, name: str) -> str:
        return f"ipc://{self.rt}/{name}"

    @property
    def placement_endpoint(self) -> str:
        return self._ipc("placement.sock")

    @property
    def control_endpoint(self) -> str:
        return self._ipc("control.sock")

    # -- start -------------------------------------------------------------------------------
    async def run(self) -> int:
        self.rt.mkdir(parents=True, exist_ok=True, mode=0o700)
        metrics.prepare_dir(self.rt)   # before any child starts: they inherit the variable
        stale = reclaim_orphans()
        if stale:
            log.warning("removed %d shared-memory segment(s) left by dead processes", len(stale))
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(self.placement_endpoint) > 100:
            raise FerryError(f"runtime directory path {self.rt} is too long for ipc sockets",
                             code="config_error")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_event.set)
        self._pub = self.ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.placement_endpoint)
        control = self.ctx.socket(zmq.ROUTER)
        control.setsockopt(zmq.LINGER, 0)
        control.bind(self.control_endpoint)
        tasks = [asyncio.create_task(self._control_loop(control)),
                 asyncio.create_task(self._publish_loop())]
        try:
            self.notifier.status("starting engines")
            await self._start_engines()
            # The frontends import and set up beside the loads; they listen once the state
            # leaves "starting" (Dispatcher.until_serving).
            self._start_frontends()
            self.notifier.status("loading models")
            await self.apply_repository()
            self.notifier.status("starting frontends")
            self._set_state("opening")
            tasks.append(asyncio.create_task(self._watch_loop()))
            tasks.append(asyncio.create_task(self._watchdog_loop()))
            tasks.append(asyncio.create_task(self._poll_loop()))
            await self._wait_frontends_ready()
            self._set_state("ready")
            for child in [*self.engines.values(), *self.frontends.values()]:
                child.healthy_at = time.monotonic()
            for eid in self.engines:
                self._ensure_standby(eid)
            self.notifier.ready(self._status_line())
            log.info("ferry ready: %s", self._status_line())
            while not self.stop_event.is_set():
                reload_wait = asyncio.create_task(self.reload_event.wait())
                stop_wait = asyncio.create_task(self.stop_event.wait())
                await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                stop_wait.cancel()
                if self.reload_event.is_set() and not self.stop_event.is_set():
                    self.reload_event.clear()
                    await self.reload()
            return await self.drain()
        finally:
            for t in tasks:
                t.cancel()
            self._shutdown_children(5.0)
            control.close(0)
            self._pub.close(0)
            for sock in self._links.values():
                sock.close(0)
            self.ctx.destroy(linger=0)
            self._cleanup_runtime()

    async def _start_engines(self) -> None:
        devices = discover_devices(self.cfg.engines.devices)
        for dev in devices:
            eid = dev.replace(":", "")
            child = Child(f"engine-{eid}", "engine", {
                "engine_id": eid, "device": dev, "endpoint": self._ipc(f"engine-{eid}.sock"),
                "instance": self.instance, "arena_mb": self.cfg.shm.arena_mb,
                "inline_threshold": self.cfg.shm.inline_threshold_kb << 10,
                "threads": self.cfg.engines.threads, "parent_pid": os.getpid(),
                "log_level": self.log_level, "log_format": self.cfg.logging.format})
            child.meta["alive"] = False
            child.meta["memory"] = MemoryLedger(device_budget(dev, self.cfg.engines.memory_mb))
            self.engines[eid] = child
            spawn(child, self.instance)
        await asyncio.gather(*(self._await_engine(eid) for eid in self.engines))
        for child in self.engines.values():
            child.meta["alive"] = True

    async def _await_engine(self, eid: str, timeout_s: float = 60.0) -> None:
        """Connect a fresh control link and wait until the engine answers."""
        old = self._links.pop(eid, None)
        if old is not None:
            old.close(0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.engines[eid].args["endpoint"])
        self._links[eid] = sock
        asyncio.create_task(self._engine_recv(eid, sock))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.engine_call(eid, P.StatsQuery(uuid.uuid4().hex), timeout_s=1.0)
                return
            except (asyncio.TimeoutError, FerryError):
                if time.monotonic() > deadline or not self.engines[eid].running():
                    raise FerryError(f"engine {eid} did not start", code="engine_start_failed")

    async def _engine_recv(self, eid: str, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                msg, _ = P.decode(await sock.recv_multipart())
                self._replies.settle(msg)
        except (asyncio.CancelledError, zmq.ZMQError):
            return

    async def engine_call(self, eid: str, msg: P.Message, timeout_s: float = 300.0) -> P.Message:
        fut = await self._engine_send(eid, msg)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._replies.forget(msg.id)  # type: ignore[attr-defined]

    async def _engine_send(self, eid: str, msg: P.Message) -> asyncio.Future:
        """Send `msg` to engine `eid`; the future gets its reply. Messages sent one after
        another reach the engine's compute loop in that order (one pipe, one inbox)."""
        fut = self._replies.expect(msg.id)  # type: ignore[attr-defined]
        try:
            await self._links[eid].send_multipart(P.encode(msg))
        except BaseException:
            self._replies.forget(msg.id)  # type: ignore[attr-defined]
            raise
        return fut

    def _frontend_args(self, **extra: Any) -> dict[str, Any]:
        s = self.cfg.server
        return {"instance": self.instance, "placement": self.placement_endpoint,
                "control": self.control_endpoint, "arena_mb": max(16, self.cfg.shm.arena_mb // 4),
                "inline_threshold": self.cfg.shm.inline_threshold_kb << 10,
                "parent_pid": os.getpid(), "log_level": self.log_level,
                "log_format": self.cfg.logging.format, "request_timeout_s": s.request_timeout_s,
                "drain_grace_s": s.drain_grace_s, "max_body": s.max_body_mb << 20,
                "header_timeout_s": s.header_timeout_s, "body_timeout_s": s.body_timeout_s,
                "max_connections": s.max_connections, "workers": s.workers,
                "resume": {"window_s": s.stream_resume_window_s,
                           "max_bytes_per_key": s.stream_resume_max_kb_per_key << 10,
                           "runtime_dir": str(self.cfg.runtime_dir)},
                "state_dir": str(self.cfg.state_dir), "auth": {
                    "required": self.cfg.auth.required, "allow_ips": list(self.cfg.auth.allow_ips),
                    "jwt_secret_file": self.cfg.auth.jwt_secret_file,
                    "webhook_allow_cidrs": list(self.cfg.auth.webhook_allow_cidrs)},
                "cors_origins": list(s.cors_origins), "log_bodies": self.cfg.logging.log_bodies,
                **extra}

    def _check_port_free(self) -> None:
        """Workers bind with SO_REUSEPORT, which would silently share the port with another
        daemon; a plain bind first makes a port in use a clear start-up error."""
        import socket
        host, port = self.cfg.server.host, self.cfg.server.port
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        # SO_REUSEADDR: connections of a just-stopped daemon in TIME_WAIT must not block a
        # restart; a socket still listening on the port is refused all the same.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise FerryError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             code="port_in_use") from None
        finally:
            probe.close()

    def _start_frontends(self) -> None:
        s = self.cfg.server
        self._check_port_free()
        for w in range(s.workers):
            child = Child(f"http{w}", "http", self._frontend_args(worker=w, host=s.host,
                                                                  port=s.port))
            self.frontends[child.name] = child
        zmq_child = Child("zmq", "zmq", self._frontend_args(bind=self.cfg.zmq_endpoint))
        self.frontends["zmq"] = zmq_child
        for child in self.frontends.values():
            spawn(child, self.instance)

    async def _wait_frontends_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while set(self.frontends) - self.frontends_ready:
            dead = [c.name for c in self.frontends.values() if not c.running()]
            if dead or time.monotonic() > deadline:
                raise FerryError(f"frontend(s) failed to start: {dead or 'timeout'}",
                                 code="frontend_start_failed")
            await asyncio.sleep(0.05)

    # -- models ------------------------------------------------------------------------------
    def alive_engines(self) -> list[str]:
        return [eid for eid, c in self.engines.items() if c.meta.get("alive")]

    async def apply_repository(self) -> dict[str, Any]:
        """Load what the repository and version policy want; drain and unload the rest.

        New versions load and warm before old ones drain, so traffic never lacks a version.
        """
        async with self.repository_lock:
            wanted: dict[tuple[str, int], Path] = {}
            for name, versions in scan(self.cfg.model_repository).items():
                for v, path in select_versions(versions, self.cfg.repository.version_policy).items():
                    wanted[(name, v)] = path
            if self.cfg.repository.control_mode == "explicit":
                if self.state == "starting":     # only what startup_models names
                    patterns = self.cfg.repository.startup_models
                    wanted = {k: p for k, p in wanted.items()
                              if any(fnmatch.fnmatchcase(k[0], pat) for pat in patterns)}
                else:                           # disk alone changes nothing
                    wanted = {k: p for k, p in wanted.items() if k in self.models}
            loads = [k for k in wanted if k not in self.models or self.models[k].state == "failed"
                     or (self.models[k].state == "ready"
                         and self.models[k].fingerprint != fingerprint(wanted[k]))]
            results = await asyncio.gather(*(self.load_version(k[0], k[1], wanted[k])
                                             for k in loads))
            failed = {k[0] for k, ok in zip(loads, results) if not ok}
            # A model whose new version failed to load keeps serving the versions it has (as
            # Triton does); they go once a version that loads replaces them.
            stale = [k for k in self.models if k not in wanted
                     and (k[0] not in failed or self.models[k].state != "ready")]
            await self.unload_versions(stale)
            return {"loaded": [f"{n}:{v}" for (n, v), ok in zip(loads, results) if ok],
                    "unloaded": [f"{n}:{v}" for n, v in stale]}

    async def load_version(self, name: str, version: int, path: Path) -> bool:
        """Load (or reload in place) a version on every live engine. A reload keeps serving the
        old weights until the new ones are loaded and warm; the engine swaps them atomically."""
        current = self.models.get((name, version))
        reloading = current is not None and current.state == "ready"
        mv = ModelVersion(name, version, path)
        if not reloading:
            self.models[(name, version)] = mv
        try:
            mv.fingerprint = fingerprint(path)
            spec = await asyncio.get_running_loop().run_in_executor(
                None, load_spec, path, name, version)    # hashing weights must not block
            mv.sha256, mv.engine_kind = spec.sha256, spec.engine
            targets = self.alive_engines()
            self._reserve(f"{name}:{version}", estimate_bytes(spec), targets)
            try:
                replies = await asyncio.gather(*(self.engine_call(
                    eid, P.Load(uuid.uuid4().hex, name, version, str(path))) for eid in targets))
            except FerryError:
                if not reloading:
                    self._release(f"{name}:{version}")
                raise
        except FerryError as exc:
            log.error("model %s v%d failed to load: %s", name, version, exc.message)
            if reloading:   # keep serving what works; a fixed file is retried on change
                current.fingerprint = mv.fingerprint  # type: ignore[union-attr]
                current.error = exc.message  # type: ignore[union-attr]
                return False
            mv.state, mv.error, mv.error_code = "failed", exc.message, (exc.code, exc.status)
            self.publish()
            return False
        self.models[(name, version)] = mv
        mv.engines, mv.info = targets, replies[0].info  # type: ignore[attr-defined]
        measured = (mv.info or {}).get("extra", {}).get("memory_bytes")
        if isinstance(measured, int) and measured > 0:   # what the engine holds beats a guess
            for eid in targets:
                self._ledger(eid).reserved[f"{name}:{version}"] = measured
        mv.state = "ready"
        log.info("model %s v%d ready on %s", name, version, ",".join(targets))
        self.publish()
        return True

    async def unload_versions(self, keys: list[tuple[str, int]]) -> None:
        if not keys:
            return
        for k in keys:
            self.models[k].state = "draining"
        self.publish()
        # Frontends must see "draining" before the engine stops taking the version.
        await asyncio.sleep(0.5)
        await asyncio.gather(*(self._unload(k) for k in keys))

    async def _unload(self, key: tuple[str, int]) -> None:
        mv = self.models[key]
        for eid in mv.engines:
            if self.engines[eid].meta.get("alive"):
                try:
                    await self.engine_call(eid, P.Unload(uuid.uuid4().hex, *key))
                except FerryError as exc:
                    log.warning("unload of %s v%d on %s: %s", *key, eid, exc.message)
        del self.models[key]
        self._release(f"{key[0]}:{key[1]}")
        self.publish()

    def _ledger(self, eid: str) -> MemoryLedger:
        ledger: MemoryLedger = self.engines[eid].meta["memory"]
        return ledger

    def _reserve(self, key: str, nbytes: int, engines: list[str]) -> None:
        """Reserve memory for `key` on every engine, or on none (InsufficientMemory)."""
        done: list[str] = []
        previous = {eid: self._ledger(eid).reserved.get(key) for eid in engines}
        try:
            for eid in engines:
                self._ledger(eid).reserve(key, nbytes, eid)
                done.append(eid)
        except FerryError:
            for eid in done:
                old = previous[eid]
                if old is None:
                    self._ledger(eid).release(key)
                else:
                    self._ledger(eid).reserved[key] = old
            raise

    def _release(self, key: str) -> None:
        for eid in self.engines:
            self._ledger(eid).release(key)

    # -- placement ---------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.publish()

    def placement(self) -> P.Placement:
        engines = {eid: {"endpoint": c.args["endpoint"], "device": c.args["device"],
                         "generation": c.generation, "alive": bool(c.meta.get("alive")),
                         "pid": c.pid, "restarts": c.restarts,
                         "memory": c.meta["memory"].as_dict()}
                   for eid, c in self.engines.items()}
        auth = self.cfg.auth
        config = {"auth": {"required": auth.required, "allow_ips": list(auth.allow_ips),
                           "webhook_allow_cidrs": list(auth.webhook_allow_cidrs)},
                  "log_level": self.log_level,
                  "load_shedding": {"max_waiting": self.cfg.server.max_waiting,
                                    "max_queue_wait_s": self.cfg.server.max_queue_wait_s},
                  "compat": {"root": self.cfg.compat.root,
                             "text_model": self.cfg.compat.text_model},
                  "templates": dataclasses.asdict(self.cfg.templates),
                  "custom_metrics": dataclasses.asdict(self.cfg.custom_metrics),
                  "tracing": dataclasses.asdict(self.cfg.tracing)}
        models: dict[str, Any] = {}
        for (name, version), mv in sorted(self.models.items()):
            entry = models.setdefault(name, {"versions": {}})
            entry["versions"][str(version)] = {
                "engines": mv.engines, "info": mv.info, "sha256": mv.sha256, "state": mv.state,
                "engine": mv.engine_kind, "error": mv.error, "path": str(mv.path)}
        return P.Placement(self.epoch, engines, models, self.state, config=config,
                           regions=list(self.regions.values()))

    def publish(self) -> None:
        self.epoch += 1
        if self._pub is not None:
            self._pub.send_multipart(P.encode(self.placement()))

    async def _publish_loop(self) -> None:
        while True:   # late subscribers (restarted frontends) catch up within this period
            await asyncio.sleep(0.5)
            if self._pub is not None:
                self._pub.send_multipart(P.encode(self.placement()))

    def _status_line(self) -> str:
        ready = sum(1 for m in self.models.values() if m.state == "ready")
        alive = len(self.alive_engines())
        return (f"{self.state}: {ready} model version(s) ready, {alive}/{len(self.engines)} "
                f"engine(s) up")

    # -- watching ----------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            for eid, child in self.engines.items():
                if child.restart_at is None:
                    code = reap(child, self.instance)
                    if code is not None:
                        self._engine_died(eid, child, code)
                elif time.monotonic() >= child.restart_at and self.state != "draining":
                    asyncio.create_task(self._restart_engine(eid, child))
                    child.restart_at = float("inf")
            for eid, standby in list(self.standbys.items()):
                if not standby.running() and self.engines[eid].meta.get("alive") \
                        and self.engines[eid].restart_at is None \
                        and time.monotonic() - standby.started_at > STANDBY_RETRY_S:
                    log.warning("the standby of engine %s exited; starting another", eid)
                    self._ensure_standby(eid)
            self._watch_frontends()

    def _watch_frontends(self) -> None:
        for child in self.frontends.values():
            if child.restart_at is None:
                code = reap(child, self.instance)
                if code is None:
                    if child.healthy_at is None and child.name in self.frontends_ready:
                        child.healthy_at = time.monotonic()
                elif self.state != "draining":
                    delay = backoff_for(child, self.cfg.engines.restart_backoff_s)
                    log.error("%s exited with %s; restarting in %.2f s", child.name, code,
                              delay, extra={"backoff_s": delay})
                    child.restarts += 1
                    child.restart_at = time.monotonic() + delay
            elif time.monotonic() >= child.restart_at and self.state != "draining":
                self.frontends_ready.discard(child.name)   # it says so again once listening
                spawn(child, self.instance)

    def _engine_died(self, eid: str, child: Child, code: int) -> None:
        if self.state == "draining":
            return
        delay = backoff_for(child, self.cfg.engines.restart_backoff_s)
        log.error("engine %s exited with %s; restarting in %.2f s", eid, code, delay,
                  extra={"backoff_s": delay})
        child.meta["alive"] = False
        child.meta["died_at"] = time.monotonic()
        child.restarts += 1
        child.restart_at = time.monotonic() + delay
        self._set_state("degraded")
        self.publish()
        self.notifier.status(self._status_line())

    async def _restart_engine(self, eid: str, child: Child) -> None:
        """Bring a dead engine back. It is announced alive (frontends replay what it held) as
        soon as it answers and has queued the loads of its models, before they finish: each
        request waits in the engine for its own model only, so tensor models serve again
        while an LLM is still loading. The daemon is ready again once every load is done."""
        died = child.meta.get("died_at", time.monotonic())
        standby = self.standbys.pop(eid, None)
        if standby is None or not take_over(child, standby):
            spawn(child, self.instance)
        timings = {"spawned": time.monotonic() - died}
        loads: list[tuple[ModelVersion, asyncio.Future]] = []
        try:
            await self._await_engine(eid)
            timings["answered"] = time.monotonic() - died
            for region in self.regions.values():
                await self.engine_call(eid, P.RegisterRegion(uuid.uuid4().hex, region["name"],
                                                             region["key"], region["offset"],
                                                             region["nbytes"]))
            hosted = [mv for mv in self.models.values() if eid in mv.engines]
            for mv in sorted(hosted, key=_load_order):   # cheap tensor models first
                msg = P.Load(uuid.uuid4().hex, mv.name, mv.version, str(mv.path))
                loads.append((mv, await self._engine_send(eid, msg)))
            # answered after every Load was handled: the engine holds requests for them now
            await self.engine_call(eid, P.StatsQuery(uuid.uuid4().hex), timeout_s=30.0)
            child.meta["alive"] = True
            self.publish()
            timings["announced"] = time.monotonic() - died
            log.info("engine %s answers (generation %d), %d model load(s) under way; %.2f s "
                     "after its death", eid, child.generation, len(loads), timings["announced"])
            for mv, fut in loads:
                await asyncio.wait_for(fut, 300.0)
                timings[f"{mv.name}:{mv.version}"] = time.monotonic() - died
        except (FerryError, asyncio.TimeoutError) as exc:
            why = exc.message if isinstance(exc, FerryError) else "timed out"
            log.error("engine %s failed to come back: %s", eid, why)
            child.meta["alive"] = False
            child.signal(signal.SIGKILL)
            return   # the watch loop sees it die and schedules another restart
        finally:
            for _, fut in loads:
                if not fut.done():
                    fut.cancel()
            self._replies.prune()      # the cancelled loads' entries
        child.restart_at = None
        child.healthy_at = time.monotonic()
        self._ensure_standby(eid)    # after the recovery: it must not compete with the loads
        if all(c.meta.get("alive") for c in self.engines.values()):
            self._set_state("ready")
        self.publish()
        self.notifier.status(self._status_line())
        log.info("engine %s is back (generation %d), %.2f s after its death: %s", eid,
                 child.generation, time.monotonic() - died,
                 ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
                 extra={"recovery_s": time.monotonic() - died,
                        "announced_s": timings["announced"]})

    def _ensure_standby(self, eid: str) -> None:
        """With `[engines] standby`, keep one waiting standby per engine (a dead one is
        replaced here, on the watch loop's next pass after its engine is up)."""
        if self.cfg.engines.standby == "off" or self.state == "draining":
            return
        current = self.standbys.get(eid)
        if current is not None and current.running():
            return
        if current is not None:
            reap(current, self.instance)
        engine = self.engines[eid]
        hosted = [[mv.name, mv.version, str(mv.path)] for mv in self.models.values()
                  if eid in mv.engines and mv.state == "ready"]
        standby = Child(f"standby-{eid}", "standby", {**engine.args, "preload": hosted,
                                                      "standby": self.cfg.engines.standby})
        self.standbys[eid] = standby
        spawn_standby(standby)

    async def _poll_loop(self) -> None:
        """control_mode = "poll": apply repository changes (new, removed or changed versions)."""
        last: tuple | None = None
        while True:
            await asyncio.sleep(self.cfg.repository.poll_interval_s)
            if self.cfg.repository.control_mode != "poll" or self.state == "draining":
                continue
            current: tuple | None = self._repository_fingerprint()
            # The first look in poll mode applies too: a model added between a SIGHUP that
            # switched to poll and that look would otherwise be taken as the baseline.
            if current != last:
                log.info("model repository changed; applying")
                try:
                    await self.apply_repository()
                except Exception:   # a bad repository state must not stop polling
                    log.exception("applying the repository failed")
                    current = None
            last = current

    def _repository_fingerprint(self) -> tuple:
        return tuple((name, v, fingerprint(p)) for name, versions in
                     sorted(scan(self.cfg.model_repository).items())
                     for v, p in sorted(versions.items()))

    async def validate(self, name: str, version: int, path: Path) -> dict[str, Any]:
        """Load a candidate model on one engine under a private name, then unload it: what an
        upload must pass before it becomes visible."""
        engines = self.alive_engines()
        if not engines:
            raise FerryError("no engine is available to validate the model",
                             code="engine_unavailable", status=503)
        probe = f"{name}.validate-{uuid.uuid4().hex[:8]}"
        spec = await asyncio.get_running_loop().run_in_executor(None, load_spec, path, name,
                                                                version)
        self._reserve(probe, estimate_bytes(spec), engines[:1])   # refuses what cannot fit
        self._release(probe)
        reply = await self.engine_call(engines[0], P.Load(uuid.uuid4().hex, probe, version,
                                                          str(path)))
        await self.engine_call(engines[0], P.Unload(uuid.uuid4().hex, probe, version))
        return reply.info or {}  # type: ignore[attr-defined]

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 only while every live engine answers: a hung engine stops the pings."""
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            await asyncio.sleep(interval)
            if self.state in ("starting", "opening"):
                continue   # systemd hears READY=1 first; start-up has its own timeout
            try:
                await asyncio.gather(*(self.engine_call(eid, P.StatsQuery(uuid.uuid4().hex),
                                                        timeout_s=interval)
                                       for eid in self.alive_engines()))
            except (asyncio.TimeoutError, FerryError):
                log.error("an engine did not answer its health check")
                continue
            self.notifier.watchdog()

    # -- reload / drain ----------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: re-read the config file and the repository, without dropping requests.

        Applied live: `[repository]`, `[auth]` required / allow_ips / webhook_allow_cidrs,
        `[server]` max_waiting / max_queue_wait_s, `[compat]` (root, text_model: the frontends
        choose seed routes per request) and `[tracing]` (frontends get them with the next
        placement; each change is logged). Everything else needs a restart and is logged as
        such."""
        self.notifier.reloading()
        try:
            if self.config_path:
                new = load_config(self.config_path)
                # Only the live settings change: a child restarted later must not pick up a new
                # port or path that the rest of the daemon does not use yet.
                effective = dataclasses.replace(
                    self.cfg, repository=new.repository, compat=new.compat,
                    tracing=new.tracing, auth=dataclasses.replace(
                        self.cfg.auth, **{k: getattr(new.auth, k) for k in _LIVE_AUTH}),
                    server=dataclasses.replace(
                        self.cfg.server, **{k: getattr(new.server, k) for k in _LIVE_SERVER}))
                check_exposure(effective)
                _log_restart_only_changes(self.cfg, new)
                self.cfg = effective
                self.publish()
            result = await self.apply_repository()
            log.info("reloaded: %s", result)
        except Exception as exc:   # a bad reload keeps the running configuration
            log.error("reload failed, keeping the running configuration: %s", exc)
        self.notifier.ready(self._status_line())

    async def drain(self) -> int:
        grace = self.cfg.server.drain_grace_s
        log.info("draining (grace %.1f s)", grace)
        self.notifier.stopping()
        self._set_state("draining")
        fronts = list(self.frontends.values())
        await asyncio.get_running_loop().run_in_executor(
            None, stop_all, fronts, self.instance, grace + 5.0)
        await asyncio.get_running_loop().run_in_executor(
            None, stop_all, [*self.engines.values(), *self.standbys.values()], self.instance,
            10.0)
        return 0

    def _shutdown_children(self, timeout_s: float) -> None:
        stop_all([*self.frontends.values(), *self.engines.values(), *self.standbys.values()],
                 self.instance, timeout_s)
        reclaim(self.instance)

    def _cleanup_runtime(self) -> None:
        for name in ["placement.sock", "control.sock", "ferry.zmq",
                     *(f"engine-{eid}.sock" for eid in self.engines)]:
            try:
                (self.rt / name).unlink()
            except FileNotFoundError:
                pass
        metrics.remove_dir(self.rt)

    # -- control -----------------------------------------------------------------------------
    async def _control_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            identity, *frames = await sock.recv_multipart()
            asyncio.create_task(self._control_one(sock, identity, frames))

    async def _control_one(self, sock: zmq.asyncio.Socket, identity: bytes,
                           frames: list[bytes]) -> None:
        msg_id = ""
        try:
            msg, _ = P.decode(frames)
            if not isinstance(msg, P.Control):
                raise InvalidInput("expected a control message", code="bad_message")
            msg_id = msg.id
            result = await self.control(msg.op, msg.args)
            reply = P.ControlReply(msg_id, True, result)
        except FerryError as exc:
            reply = P.ControlReply(msg_id, False, error=exc.to_wire())
        await sock.send_multipart([identity, *P.encode(reply)])

    async def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return await handle_control(self, op, args)


# A standby that exited is replaced at most this often (a broken one must not spin).
STANDBY_RETRY_S = 10.0

# Restart order of a dead engine's models: tensor engines load in a fraction of a second and
# serve while the LLM and diffusion models (seconds each) are still loading.
_HEAVY_ENGINES = ("llm", "diffusion")


def _load_order(mv: ModelVersion) -> tuple[bool, str, int]:
    return mv.engine_kind in _HEAVY_ENGINES, mv.name, mv.version


_LIVE_AUTH = ("required", "allow_ips", "webhook_allow_cidrs")   # [repository] is live too
_LIVE_SERVER = ("max_waiting", "max_queue_wait_s")    # load shedding, published with placement
_LIVE_SECTIONS = ("compat", "tracing")                # wholly live, published with placement


def _log_restart_only_changes(old: Config, new: Config) -> None:
    """Warn about reloaded settings that only a restart applies (listen address, paths, …)."""
    for section in dataclasses.fields(Config):
        if section.name == "repository":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        live = {"auth": _LIVE_AUTH, "server": _LIVE_SERVER}.get(section.name, ())
        for f in dataclasses.fields(before):
            if getattr(before, f.name) == getattr(after, f.name):
                continue
            if f.name in live or section.name in _LIVE_SECTIONS:
                log.info("reload: %s.%s = %r, applied now", section.name, f.name,
                         getattr(after, f.name))
            else:
                log.warning("reload: %s.%s changed; it applies at the next restart",
                            section.name, f.name)
