"""A frontend's request to the supervisor's control socket (daemon/control.py): one DEALER
round trip per call, its error rebuilt as the FerryError the supervisor raised."""
from __future__ import annotations

import uuid
from typing import Any

import zmq
import zmq.asyncio

from daemon import protocol as P
from daemon.errors import FerryError, error_from_wire

__all__ = ["call_supervisor"]


async def call_supervisor(ctx: zmq.asyncio.Context, endpoint: str, op: str,
                          args: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The result of control operation `op`; 504 supervisor_timeout when it does not answer."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart(P.encode(P.Control(uuid.uuid4().hex, op, args)))
        if not await sock.poll(int(timeout_s * 1000)):
            raise FerryError("the supervisor did not answer", code="supervisor_timeout",
                             status=504)
        reply, _ = P.decode(await sock.recv_multipart())
    finally:
        sock.close(0)
    if not isinstance(reply, P.ControlReply):
        raise FerryError("unexpected reply from the supervisor", code="internal_error")
    if not reply.ok:
        raise error_from_wire(reply.error or {})
    return reply.result
