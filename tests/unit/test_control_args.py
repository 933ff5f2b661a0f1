"""The supervisor's control operations: one table entry per operation, each reading typed
arguments that refuse a bad `args` map with the code its callers match (unit: no daemon; the
handlers run against a real supervisor in the integration tests)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon import control
from daemon.control_args import (IndexArgs, LoadArgs, LogLevelArgs, ModelArgs, RegionArgs,
                                 RegionNameArgs, ValidateArgs)
from daemon.errors import InvalidInput


def test_every_operation_is_documented_and_parses_empty_args_or_names_what_is_missing():
    assert set(control.OPS) == {"epoch", "frontend_ready", "index", "load", "unload",
                                "register_region", "unregister_region", "validate",
                                "log_level", "reload", "status"}
    for op, entry in control.OPS.items():
        assert f" {op} " in control.__doc__, op
        try:
            entry.parse({})
        except InvalidInput as e:
            assert e.status == 400, op


@pytest.mark.parametrize("op, args", [("nope", {}), (3, {}), ("index", [1]),
                                      ("status", "x")])
def test_unknown_operations_and_non_map_args_are_refused_before_any_work(op, args):
    with pytest.raises(InvalidInput) as e:
        asyncio.run(control.handle_control(None, op, args))      # no host: nothing touched
    assert e.value.code in ("unknown_operation", "bad_message")
    assert e.value.status == 400


@pytest.mark.parametrize("parse, args, code", [
    (ModelArgs.parse, {}, "invalid_model_name"),
    (ModelArgs.parse, {"model": 7}, "invalid_model_name"),
    (ModelArgs.parse, {"model": "../etc"}, "invalid_model_name"),
    (lambda a: LoadArgs.parse(a).checked_overrides(), {"model": "a", "overrides": [1]},
     "bad_message"),
    (LoadArgs.parse, {"model": "a b"}, "invalid_model_name"),
    (RegionArgs.parse, {"name": "r", "key": "k"}, "shm_bad_region"),
    (RegionArgs.parse, {"name": "r", "key": "k", "nbytes": True}, "shm_bad_region"),
    (RegionArgs.parse, {"name": "r", "key": "k", "nbytes": 8, "offset": 1.5}, "shm_bad_region"),
    (RegionArgs.parse, {"name": 1, "key": "k", "nbytes": 8}, "shm_bad_region"),
    (RegionNameArgs.parse, {"name": 5}, "shm_bad_region"),
    (ValidateArgs.parse, {"name": "a", "version": "1", "path": "/x"}, "bad_message"),
    (ValidateArgs.parse, {"name": "a", "version": True, "path": "/x"}, "bad_message"),
    (LogLevelArgs.parse, {"level": "verbose"}, "invalid_log_setting"),
    (LogLevelArgs.parse, {"level": 10}, "invalid_log_setting"),
])
def test_bad_arguments_are_refused_with_their_code(parse, args, code):
    with pytest.raises(InvalidInput) as e:
        parse(args)
    assert (e.value.code, e.value.status) == (code, 400)


@pytest.mark.parametrize("op, args", [("load", {"model": "a b"}), ("unload", {"model": 5}),
                                      ("load", {"model": "m", "overrides": [1]}), ("load", [])])
def test_control_mode_none_refuses_loads_and_unloads_before_reading_them(op, args):
    """Triton's answer in control mode "none" holds whatever the request names."""
    from types import SimpleNamespace

    from daemon.config import Config
    host = SimpleNamespace(cfg=Config())             # repository.control_mode = "none"
    with pytest.raises(InvalidInput) as e:
        asyncio.run(control.handle_control(host, op, args))
    assert (e.value.code, e.value.status) == ("model_control_disabled", 400)


def test_good_arguments_are_typed():
    assert LoadArgs.parse({"model": "m", "overrides": {"a": 1}, "repository": "/u"}) == \
        LoadArgs("m", "/u", {"a": 1})
    assert RegionArgs.parse({"name": "r", "key": "k", "nbytes": 8}) == RegionArgs("r", "k", 8, 0)
    assert RegionNameArgs.parse({}).name is None
    assert ValidateArgs.parse({"name": "a", "version": 2, "path": "/p"}).path == Path("/p")
    assert LogLevelArgs.parse({}).level is None and LogLevelArgs.parse({"level": "debug"}).level
    assert IndexArgs.parse({"ready": 1}).ready is True and IndexArgs.parse({}).ready is False
