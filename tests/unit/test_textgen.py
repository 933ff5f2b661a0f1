"""The frontend side of generation: stop strings on streamed text, and (with SmolLM2's real
tokenizer) incremental decoding of engine token streams into pieces."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.http.textgen import StopMatcher

pytestmark = pytest.mark.timeout(60)


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    emitted = []
    for c in chunks:
        out, stopped = m.push(c)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True, emitted
    emitted.append(m.flush())
    return "".join(emitted), False, emitted


def test_stop_inside_one_chunk_cuts_before_it():
    assert run(["END"], ["abcENDxyz"])[:2] == ("abc", True)


def test_stop_split_over_chunks_is_held_back_then_cut():
    text, stopped, emitted = run(["END"], ["abE", "N", "Dzz"])
    assert (text, stopped) == ("ab", True)
    assert emitted[:2] == ["ab", ""]          # "E" and "EN" could start the stop: held


def test_false_start_is_released_as_soon_as_it_cannot_match():
    m = StopMatcher(["END"])
    assert m.push("abE") == ("ab", False)
    assert m.push("x") == ("Ex", False)


def test_earliest_of_several_stops_wins():
    assert run(["zz", "b"], ["a", "bzz"])[:2] == ("a", True)
    assert run(["\n\n", "\n"], ["one\n\ntwo"])[:2] == ("one", True)


def test_no_stops_passes_everything_through():
    m = StopMatcher([])
    assert m.push("abc") == ("abc", False) and m.flush() == ""


def test_held_tail_is_flushed_at_the_end():
    assert run(["END"], ["aEN"])[:2] == ("aEN", False)


def _ends(text: str, stop: str) -> list[int]:
    return [i + len(stop) for i in range(len(text)) if text.startswith(stop, i)]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abE N\n", max_size=40),
       stops=st.lists(st.text(alphabet="abEN\n", min_size=1, max_size=4), min_size=1,
                      max_size=4),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_any_chunking_stops_at_the_first_completed_stop(text, stops, cuts):
    """However the text is chunked: the output is a prefix of the text holding no stop string,
    followed in the text by a stop string, and cut before the first stop completes."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    ends = [e for stop in stops for e in _ends(text, stop)]
    out, stopped, _ = run(stops, chunks)
    if not ends:
        assert (out, stopped) == (text, False)
        return
    assert stopped and text.startswith(out)
    assert any(text[len(out):].startswith(s) for s in stops)
    assert len(out) < min(ends) and not any(s in out for s in stops)


def test_one_chunk_equals_whole_text_semantics():
    assert run(["a", "EaE"], ["EaE"])[0] == ""       # earliest start within what is known
    assert run(["a", "EaE"], ["Ea", "E"])[0] == "E"  # "a" completed first: stop there


# -- context budget ------------------------------------------------------------------------------

def text_model(ctx: int = 100, vocab: int = 50):
    from frontends.http.textgen import TextModel
    return TextModel("m", 1, tokenizer=None, context_length=ctx, vocab_size=vocab, template=None)


def test_default_max_tokens_fills_the_context():
    from frontends.http.textgen import _max_tokens
    assert _max_tokens(text_model(), 30, None, "prompt") == 70
    assert _max_tokens(text_model(), 30, 70, "prompt") == 70


@pytest.mark.parametrize("prompt_len,asked,param", [(100, None, "messages"), (150, 1, "messages"),
                                                   (30, 71, "max_tokens")])
def test_context_overflow_names_the_field_to_change(prompt_len, asked, param):
    from daemon.errors import ContextLengthExceeded
    from frontends.http.textgen import _max_tokens
    with pytest.raises(ContextLengthExceeded) as err:
        _max_tokens(text_model(), prompt_len, asked, "messages")
    assert err.value.param == param and err.value.code == "context_length_exceeded"
    assert "100" in err.value.message


def test_token_ids_outside_the_vocabulary_are_refused():
    from daemon.errors import InvalidInput
    from frontends.http.textgen import _check_token_ids
    _check_token_ids(text_model(), [0, 49], "stop_token_ids")
    with pytest.raises(InvalidInput) as err:
        _check_token_ids(text_model(), [3, 50], "stop_token_ids")
    assert err.value.param == "stop_token_ids" and "50" in err.value.message


def test_usage_totals_and_cached_details():
    from frontends.http.textgen import Usage
    assert Usage(7, 3, 4).to_dict() == {"prompt_tokens": 7, "completion_tokens": 3,
                                        "total_tokens": 10,
                                        "prompt_tokens_details": {"cached_tokens": 4}}
