"""The HTTP frontend process: aiohttp on uvloop, one of W workers sharing a port (SO_REUSEPORT).

SIGTERM drains: the listening socket closes at once (new connections are refused), requests in
flight finish within the grace period, then the process exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web

from daemon.process import init_child, run_until_signalled
from daemon.shm import Arena, RegionMap, segment_name
from frontends.dispatch import Dispatcher
from frontends.http import kserve
from frontends.http.appkeys import DISPATCHER, ON_DRAIN, SETTINGS, FrontendSettings
from frontends.http.connections import FrontendRunner, body_deadline_middleware
from frontends.http.errors import error_middleware

__all__ = ["create_app", "bind_socket", "run_http"]

log = logging.getLogger(__name__)


def create_app(dispatcher: Dispatcher, settings: FrontendSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware, body_deadline_middleware],
                          client_max_size=settings.max_body)
    app[DISPATCHER] = dispatcher
    app[SETTINGS] = settings
    app[ON_DRAIN] = []
    app.add_routes(kserve.routes)
    for extra in ("frontends.http.openai", "frontends.http.ws", "frontends.http.admin",
                  "frontends.http.vision", "frontends.http.metrics",
                  "frontends.http.admin_models", "frontends.http.batches",
                  "frontends.http.openapi", "frontends.http.prompt_templates",
                  "frontends.http.custom_metrics", "frontends.http.tracing",
                  "frontends.http.images", "frontends.http.compat", "frontends.http.resume",
                  "frontends.http.vllm_compat"):
        try:
            module = __import__(extra, fromlist=["setup"])
        except ModuleNotFoundError as exc:
            if exc.name != extra:
                raise
            continue
        module.setup(app)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve(args: dict[str, Any], stop: asyncio.Event) -> None:
    ctx = zmq.asyncio.Context()
    arena = Arena(segment_name(args["instance"], f"http{args['worker']}"), args["arena_mb"] << 20)
    dispatcher = Dispatcher(ctx, placement_endpoint=args["placement"],
                            control_endpoint=args["control"], arena=arena,
                            regions=RegionMap(args["instance"]), instance=args["instance"],
                            inline_threshold=args["inline_threshold"],
                            request_timeout_s=args["request_timeout_s"])
    runner = None
    try:
        await dispatcher.start()
        settings = FrontendSettings(args["worker"], args["max_body"], args["request_timeout_s"],
                                    args["inline_threshold"], args["body_timeout_s"])
        app = create_app(dispatcher, settings)
        from frontends.http.security import install as install_security
        install_security(app, args)   # auth, rate limits, CORS, request log (before start)
        resume = args.get("resume") or {}
        from frontends.http.resume import configure as configure_resume
        configure_resume(app, worker=args["worker"], workers=args.get("workers", 1),
                         window_s=resume.get("window_s", 0.0),
                         max_bytes_per_key=resume.get("max_bytes_per_key", 1 << 23),
                         runtime_dir=resume.get("runtime_dir"))
        runner = FrontendRunner(app, header_timeout_s=args["header_timeout_s"],
                                max_connections=args["max_connections"],
                                shutdown_timeout=args["drain_grace_s"], access_log=None,
                                handle_signals=False)
        await runner.setup()
        if not await dispatcher.until_serving(stop):
            return
        sock = bind_socket(args["host"], args["port"])
        await web.SockSite(runner, sock).start()
        await dispatcher.control("frontend_ready", {"role": f"http{args['worker']}"})
        log.info("http worker %d serving on %s:%d", args["worker"], args["host"], args["port"])
        await stop.wait()
        log.info("http worker %d draining", args["worker"])
        for hook in app[ON_DRAIN]:
            hook()
    finally:
        if runner is not None:
            await runner.cleanup()
        await dispatcher.close()
        arena.close(unlink=True)
        ctx.destroy(linger=0)


def run_http(args: dict[str, Any]) -> int:
    init_child(f"http{args['worker']}", parent_pid=args["parent_pid"],
               log_level=args.get("log_level", "info"), log_format=args.get("log_format", "json"))
    return run_until_signalled(lambda stop: _serve(args, stop))
