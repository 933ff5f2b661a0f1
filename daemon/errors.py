"""One error hierarchy for Ferry.

Recoverable request errors carry the HTTP status and a stable machine-readable code; they are
raised anywhere on the request path and mapped to a response in one place per frontend.
Engine death is its own error: the request may be replayed on the restarted engine.
"""
from __future__ import annotations

__all__ = [
    "FerryError", "InvalidInput", "ContextLengthExceeded", "ModelNotFound", "ModelUnavailable",
    "Busy", "DeadlineExceeded", "PayloadTooLarge", "UnsupportedMediaType", "Unauthorized",
    "Forbidden", "RateLimited", "Overloaded", "ProtocolMismatch", "EngineDied", "Cancelled",
    "InternalError", "ConfigError", "error_from_wire",
]


class FerryError(Exception):
    """A request error with an HTTP status and a stable code (`code` never changes meaning)."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param

    def to_wire(self) -> dict:
        wire = {"status": self.status, "code": self.code, "message": self.message,
                "param": self.param}
        retry_after = getattr(self, "retry_after", None)
        if retry_after is not None:
            wire["retry_after"] = retry_after
        return wire


class InvalidInput(FerryError):
    status, code = 400, "invalid_input"


class ContextLengthExceeded(InvalidInput):
    code = "context_length_exceeded"


class ModelNotFound(FerryError):
    status, code = 404, "model_not_found"


class ModelUnavailable(FerryError):
    status, code = 503, "model_unavailable"


class Busy(FerryError):
    status, code = 503, "busy"


class DeadlineExceeded(FerryError):
    status, code = 504, "deadline_exceeded"


class PayloadTooLarge(FerryError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(FerryError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(FerryError):
    status, code = 401, "unauthorized"


class Forbidden(FerryError):
    status, code = 403, "forbidden"


class RateLimited(FerryError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Overloaded(RateLimited):
    """Load shedding: the engine's queue is over `[server] max_waiting` / `max_queue_wait_s`;
    a router retries on another host, a client after Retry-After."""

    code = "overloaded"


class ProtocolMismatch(FerryError):
    status, code = 400, "protocol_version"


class EngineDied(FerryError):
    """The engine process holding the request died; frontends replay or report this."""

    status, code = 503, "engine_died"


class Cancelled(FerryError):
    status, code = 499, "cancelled"


class InternalError(FerryError):
    status, code = 500, "internal_error"


class ConfigError(Exception):
    """Invalid configuration; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key}: {message}")
        self.key = key


# The class each stable code comes back as across a process boundary (FerryError.to_wire ->
# error_from_wire), so a frontend can tell a replayable engine death, a retryable busy or a
# client's mistake apart by type, not by string.
_BY_CODE: dict[str, type[FerryError]] = {cls.code: cls for cls in (
    InvalidInput, ContextLengthExceeded, ModelNotFound, ModelUnavailable, Busy,
    DeadlineExceeded, PayloadTooLarge, UnsupportedMediaType, Unauthorized, Forbidden,
    RateLimited, Overloaded, ProtocolMismatch, EngineDied, Cancelled, InternalError)}


def error_from_wire(d: dict) -> FerryError:
    """Rebuild an error sent across a process boundary (by `FerryError.to_wire`) as the
    subclass its code names, keeping the status, message and param it was sent with. A code of
    its own on a 400 (`invalid_shape`, `bad_message`, ...) comes back as an `InvalidInput`; any
    error that carried `retry_after` comes back as a `RateLimited` (or its subclass), so its
    frontend sends Retry-After."""
    message, code = str(d.get("message", "")), str(d.get("code", "internal_error"))
    status, param = int(d.get("status", 500)), d.get("param")
    retry_after = d.get("retry_after")
    cls = _BY_CODE.get(code) or (InvalidInput if status == 400 else FerryError)
    if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool):
        if not issubclass(cls, RateLimited):
            cls = RateLimited
        return cls(message, code=code, status=status, param=param,
                   retry_after=float(retry_after))
    return cls(message, code=code, status=status, param=param)
