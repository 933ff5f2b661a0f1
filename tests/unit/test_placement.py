"""Reading a placement in a frontend (frontends/placement.py): names, SHA-256 ids and versions
resolve to a ready version or to a 404 / 503 in Triton's words; the least loaded live engine
is picked, a restarting one only when none is alive."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from daemon import protocol as P
from daemon.errors import ModelNotFound, ModelUnavailable
from frontends.placement import pick_engine, resolve_in, sha_index

SHA = "ab" * 32


def placement() -> P.Placement:
    def version(state: str, engines: list[str], sha: str | None = None) -> dict:
        return {"state": state, "engines": engines, "info": {"kind": "tensor", "state": state},
                "sha256": sha}
    return P.Placement(epoch=3, engines={}, models={
        "digits": {"versions": {"1": version("ready", ["a", "b"]),
                                "2": version("ready", ["b"], SHA),
                                "3": version("loading", ["a"])}},
        "cold": {"versions": {"1": version("failed", [])}},
    })


def test_names_ids_and_versions_resolve_to_ready_versions():
    pl = placement()
    index = sha_index(pl)
    assert index == {SHA: ("digits", 2)}
    assert resolve_in(pl, index, "digits", None)[:2] == ("digits", 2)      # newest ready
    assert resolve_in(pl, index, "digits", 1)[:2] == ("digits", 1)
    assert resolve_in(pl, index, SHA, None)[:2] == ("digits", 2)           # the id's version
    assert resolve_in(pl, index, SHA, 1)[:2] == ("digits", 1)              # asked for: kept


@pytest.mark.parametrize("model, version, error, param, words", [
    ("nope", None, ModelNotFound, "model", "Request for unknown model: 'nope' is not found"),
    ("digits", 9, ModelNotFound, "version", "'digits' version 9 is not found"),
    ("digits", 3, ModelUnavailable, None, "version 3 is loading"),
    ("cold", None, ModelUnavailable, None, "has no ready version"),
])
def test_misses_are_404s_and_503s_in_tritons_words(model, version, error, param, words):
    pl = placement()
    with pytest.raises(error) as e:
        resolve_in(pl, sha_index(pl), model, version)
    assert words in e.value.message and e.value.param == param
    assert e.value.status == (404 if error is ModelNotFound else 503)


def test_a_starting_daemon_is_unavailable():
    with pytest.raises(ModelUnavailable, match="starting"):
        resolve_in(None, {}, "digits", None)


@dataclass
class Link:
    name: str
    alive: bool
    outstanding: int


def test_the_least_loaded_live_engine_is_picked():
    pl = placement()
    links = {"a": Link("a", True, 5), "b": Link("b", True, 2)}
    assert pick_engine(pl, links, ("digits", 1)).name == "b"
    links["b"].alive = False                       # restarting: live ones first
    assert pick_engine(pl, links, ("digits", 1)).name == "a"
    assert pick_engine(pl, links, ("digits", 2)).name == "b"     # only host: its requests wait
    with pytest.raises(ModelUnavailable, match="no engine hosts"):
        pick_engine(pl, {}, ("digits", 1))
