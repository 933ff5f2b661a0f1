"""Structured logs: one JSON object a line, the request id as its own field."""
from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from daemon.logs import JsonFormatter, setup_logging


@pytest.fixture()
def capture():
    """A logger writing through JsonFormatter into a buffer; root handlers left alone."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter("http0"))
    logger = logging.getLogger("ferry.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, buf
    logger.handlers.clear()


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_fields_and_request_id(capture):
    logger, buf = capture
    logger.warning("request %s failed: %s", "abc", "boom",
                   extra={"request_id": "req-1", "code": "inference_failed", "status": 503})
    (line,) = lines(buf)
    assert line["msg"] == "request abc failed: boom"
    assert line["level"] == "warning" and line["logger"] == "ferry.test.logs"
    assert line["role"] == "http0" and isinstance(line["pid"], int)
    assert line["request_id"] == "req-1" and line["code"] == "inference_failed"
    assert line["status"] == 503
    assert line["ts"].endswith("Z") and "T" in line["ts"] and len(line["ts"]) == 24


def test_one_line_per_record_whatever_the_message_holds(capture):
    logger, buf = capture
    logger.info("multi\nline\r\nmessage with \"quotes\" and ünïcode \x00")
    logger.info("second")
    out = buf.getvalue().splitlines()
    assert len(out) == 2
    assert json.loads(out[0])["msg"] == "multi\nline\r\nmessage with \"quotes\" and ünïcode \x00"


def test_exception_is_one_field(capture):
    logger, buf = capture
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("handler crashed", extra={"request_id": "req-2"})
    (line,) = lines(buf)
    assert line["level"] == "error" and line["request_id"] == "req-2"
    assert "Traceback" in line["exc"] and "ValueError: bad value" in line["exc"]


def test_values_json_cannot_hold_are_repr_ed(capture):
    logger, buf = capture
    logger.info("odd extras", extra={"shape": (1, 64), "obj": object(), "none": None,
                                     "ratio": 0.5, "ok": True})
    (line,) = lines(buf)
    assert line["shape"] == "(1, 64)" and line["obj"].startswith("<object object")
    assert line["none"] is None and line["ratio"] == 0.5 and line["ok"] is True


def test_private_and_standard_attributes_stay_out(capture):
    logger, buf = capture
    logger.info("x", extra={"_secret": "no"})
    (line,) = lines(buf)
    assert "_secret" not in line
    for attr in ("args", "levelno", "pathname", "msecs", "thread", "exc_info"):
        assert attr not in line


def test_setup_logging_json_and_text(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)
        setup_logging("debug", "json", role="engine-cpu")
        assert root.level == logging.DEBUG and len(root.handlers) == 1
        logging.getLogger("ferry.test.setup").debug("hello %d", 7, extra={"request_id": "r"})
        assert logging.getLogger("aiohttp.access").level == logging.WARNING
        line = json.loads(buf.getvalue().splitlines()[-1])
        assert line["msg"] == "hello 7" and line["role"] == "engine-cpu"
        assert line["request_id"] == "r"

        buf2 = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf2)
        setup_logging("warning", "text", role="serve")
        logging.getLogger("ferry.test.setup").info("hidden")
        logging.getLogger("ferry.test.setup").warning("shown %s", "here")
        text = buf2.getvalue()
        assert "hidden" not in text
        assert "serve[" in text and "WARNING ferry.test.setup: shown here" in text
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
