"""frontends.http.json_body: client JSON that would crash json.loads' callers is a 400."""
from __future__ import annotations

import json

import pytest

from daemon.errors import InvalidInput
from frontends.http.json_body import MAX_DEPTH, decode_json


@pytest.mark.parametrize("raw, code", [
    (b'{"a":' * 100000, "invalid_json"),               # RecursionError inside json.loads
    (b"[" * 100000, "invalid_json"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "invalid_json"),   # parses, too deep
    (b'{"x": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "invalid_json"),
    (b"", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),                    # not UTF-8
    (b'"\xed\xa0\x80"', "invalid_json"),                # a surrogate as raw bytes: not UTF-8
    (b'{"content": "\\ud800"}', "invalid_text"),        # a lone high surrogate
    (b'{"content": ["ok", {"x": "a\\uDFFFb"}]}', "invalid_text"),   # a lone low one, nested
    (b'{"\\udbff": 1}', "invalid_text"),                # in a key
    ('{"content": "\\ud800"}', "invalid_text"),         # a WebSocket text frame (str)
    ('{"content": "\ud800"}', "invalid_text"),          # a str holding a raw surrogate
])
def test_hostile_json_is_invalid_input(raw, code):
    with pytest.raises(InvalidInput) as err:
        decode_json(raw)
    assert (err.value.code, err.value.status) == (code, 400)


def test_valid_json_round_trips():
    deep = [[1]] * 3
    for _ in range(MAX_DEPTH - 2):
        deep = [deep]
    for value in ({"content": "caf\u00e9 \U0001F600", "n": [1, 2.5, None, True]}, deep,
                  7):
        assert decode_json(json.dumps(value).encode()) == value
    assert decode_json(b'"\\ud83d\\ude00"') == "\U0001F600"   # an escaped surrogate pair
