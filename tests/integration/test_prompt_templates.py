"""Prompt templates end to end on a real `ferry serve` (auth required, two HTTP workers, the real
SQLite state, SmolLM2): the admin API and its scope, rendering into /v1/completions (echo shows
the prompt the model got) and /v1/chat/completions through the official `openai` client, a
template made through one worker rendering through the other, and every bad input a 4xx with a
stable code, sandbox escapes included."""
from __future__ import annotations

import pytest

from tests.integration.conftest import stopped_cleanly, tensor_repo
from tests.integration.secure_daemon import SecureDaemon, admin_and_infer_keys, call, error_code
from tests.integration.worker_conn import on_worker

pytestmark = pytest.mark.timeout(240)

BASE = "/admin/prompt-templates"
# Small limits, so the [templates] section is seen to reach the workers.
CONFIG = ("[auth]\nrequired = true\n[templates]\nmax_source_chars = 4000\n"
          "max_output_chars = 3000\nmax_steps = 200000\n")


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("smollm2",)), workers=2,
                     extra_config=CONFIG, env={"FERRY_TORCH_THREADS": "1"})
    d.keys = d.state(admin_and_infer_keys)
    d.start()
    yield d
    stopped_cleanly(d)


def admin(d, method, path, body=None, **kw):
    return call(d, method, path, key=d.keys["admin"], body=body, **kw)


def infer(d, path, body, **kw):
    return call(d, "POST", path, key=d.keys["infer"], body=body, **kw)


def _make(d, name, template, **extra):
    status, _, body = admin(d, "POST", BASE, {"name": name, "template": template, **extra})
    assert status == 201, body
    return body


# -- the admin API ------------------------------------------------------------------------------

def test_create_list_get_version_delete(ferry):
    made = _make(ferry, "life", "v1 {{ x }}", description="first")
    assert made["name"] == "life" and made["version"] == 1 and made["versions"] == [1]
    assert made["template"] == "v1 {{ x }}" and made["description"] == "first"
    status, _, body = admin(ferry, "POST", BASE, {"name": "life", "template": "again"})
    assert status == 409 and error_code(body) == "template_exists"
    status, _, v2 = admin(ferry, "POST", f"{BASE}/life/versions", {"template": "v2 {{ x }}"})
    assert status == 201 and v2["version"] == 2 and v2["versions"] == [1, 2]
    status, _, listed = admin(ferry, "GET", BASE)
    entry = next(t for t in listed["data"] if t["name"] == "life")
    assert status == 200 and entry["latest_version"] == 2 and entry["versions"] == [1, 2]
    assert admin(ferry, "GET", f"{BASE}/life")[2]["template"] == "v2 {{ x }}"
    assert admin(ferry, "GET", f"{BASE}/life?version=1")[2]["template"] == "v1 {{ x }}"
    status, _, gone = admin(ferry, "DELETE", f"{BASE}/life/versions/2")
    assert status == 200 and gone["versions_removed"] == 1
    assert admin(ferry, "GET", f"{BASE}/life")[2]["version"] == 1
    status, _, gone = admin(ferry, "DELETE", f"{BASE}/life")
    assert status == 200 and gone["versions_removed"] == 1
    for path in (f"{BASE}/life", f"{BASE}/life?version=1"):
        status, _, body = admin(ferry, "GET", path)
        assert status == 404 and error_code(body) == "template_not_found"
    status, _, body = admin(ferry, "DELETE", f"{BASE}/life")
    assert status == 404 and error_code(body) == "template_not_found"


def test_the_admin_api_needs_the_admin_scope(ferry):
    status, _, body = call(ferry, "GET", BASE)
    assert status == 401, body
    status, _, body = call(ferry, "POST", BASE, key=ferry.keys["infer"],
                           body={"name": "x", "template": "y"})
    assert status == 403, body
    assert admin(ferry, "GET", f"{BASE}/x")[0] == 404     # nothing was made


@pytest.mark.parametrize("body,status,code", [
    ({"template": "x"}, 400, "missing_parameter"),
    ({"name": "bad name", "template": "x"}, 400, "invalid_input"),
    ({"name": "-x", "template": "x"}, 400, "invalid_input"),
    ({"name": "a" * 129, "template": "x"}, 400, "invalid_input"),
    ({"name": 5, "template": "x"}, 400, "invalid_input"),
    ({"name": "ok", "template": 5}, 400, "invalid_template"),
    ({"name": "ok", "template": ""}, 400, "invalid_template"),
    ({"name": "ok"}, 400, "invalid_template"),
    ({"name": "ok", "template": "{{ x "}, 400, "invalid_template"),
    ({"name": "ok", "template": "{{ ''.__class__.__mro__ }}"}, 400, "invalid_template"),
    ({"name": "ok", "template": "{{ cycler.__init__.__globals__ }}"}, 400, "invalid_template"),
    ({"name": "ok", "template": "{% include 'x' %}"}, 400, "invalid_template"),
    ({"name": "ok", "template": "x" * 4001}, 413, "template_too_large"),
    ({"name": "ok", "template": "x", "colour": "red"}, 400, "unknown_parameter"),
    ({"name": "ok", "template": "x", "description": 5}, 400, "invalid_input"),
    ([1, 2], 400, "invalid_json"),
])
def test_bad_create_bodies(ferry, body, status, code):
    got, _, reply = admin(ferry, "POST", BASE, body)
    assert (got, error_code(reply)) == (status, code), reply
    assert admin(ferry, "GET", f"{BASE}/ok")[0] == 404


def test_bad_admin_requests(ferry):
    _make(ferry, "adm", "x")
    cases = [
        ("POST", BASE, b"{not json", 400, "invalid_json"),
        ("GET", f"{BASE}/adm?version=0", None, 400, "invalid_input"),
        ("GET", f"{BASE}/adm?version=abc", None, 400, "invalid_input"),
        ("GET", f"{BASE}/adm?version=9", None, 404, "template_not_found"),
        ("GET", f"{BASE}/adm?colour=red", None, 400, "unknown_parameter"),
        ("DELETE", f"{BASE}/adm/versions/x", None, 400, "invalid_input"),
        ("DELETE", f"{BASE}/adm/versions/7", None, 404, "template_not_found"),
        ("POST", f"{BASE}/nothing/versions", b'{"template": "x"}', 404, "template_not_found"),
        ("POST", f"{BASE}/adm/versions", b'{"template": "{% if %}"}', 400, "invalid_template"),
        ("POST", f"{BASE}/adm/versions", b'{"name": "adm", "template": "x"}', 400,
         "unknown_parameter"),
    ]
    for method, path, raw, status, code in cases:
        got, _, reply = admin(ferry, method, path, raw=raw,
                              headers={"Content-Type": "application/json"})
        assert (got, error_code(reply)) == (status, code), (method, path, reply)
    assert admin(ferry, "GET", f"{BASE}/adm")[2]["versions"] == [1]


# -- rendering ----------------------------------------------------------------------------------

def test_a_template_made_through_one_worker_renders_through_the_other(ferry):
    assert len(ferry.child_pids("http")) == 2
    made_on, status, body, _ = on_worker(
        ferry, None, "POST", BASE, {"name": "story", "template":
                                    "Once upon a time, {{ hero }} met {{ friends|join(' and ') }}"},
        ferry.keys["admin"])
    assert status == 201, body
    used_on, status, body, _ = on_worker(
        ferry, None, "POST", "/v1/completions",
        {"model": "smollm2", "max_tokens": 2, "temperature": 0, "echo": True,
         "prompt_template": {"name": "story", "variables": {"hero": "Ada",
                                                            "friends": ["Bo", "Cy"]}}},
        ferry.keys["infer"], avoid=made_on)
    assert used_on != made_on
    assert status == 200, body
    assert body["choices"][0]["text"].startswith("Once upon a time, Ada met Bo and Cy")
    # A new version is seen by the other worker at once; pinning keeps the old one.
    _, status, _, _ = on_worker(ferry, used_on, "POST", f"{BASE}/story/versions",
                              {"template": "Twice {{ hero }}"}, ferry.keys["admin"])
    assert status == 201
    for version, start in ((None, "Twice Ada"), (1, "Once upon a time, Ada")):
        spec = {"name": "story", "variables": {"hero": "Ada", "friends": []}}
        if version is not None:
            spec["version"] = version
        _, status, body, _ = on_worker(ferry, made_on, "POST", "/v1/completions",
                                     {"model": "smollm2", "max_tokens": 1, "echo": True,
                                      "prompt_template": spec}, ferry.keys["infer"])
        assert status == 200 and body["choices"][0]["text"].startswith(start), body


def test_chat_appends_the_rendered_message_through_the_openai_client(ferry):
    import openai
    _make(ferry, "ask", "Answer briefly: what is {{ thing }}?")
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=ferry.keys["infer"],
                           max_retries=0, timeout=120)
    try:
        system = [{"role": "system", "content": "You are terse."}]
        templated = client.chat.completions.create(
            model="smollm2", messages=system, max_tokens=1, temperature=0,
            extra_body={"prompt_template": {"name": "ask", "variables": {"thing": "rain"}},
                        "deterministic": True})
        # deterministic: the second is a prefix-cache hit, which must not move a greedy tie
        explicit = client.chat.completions.create(
            model="smollm2", max_tokens=1, temperature=0, extra_body={"deterministic": True},
            messages=[*system, {"role": "user", "content": "Answer briefly: what is rain?"}])
        assert templated.usage.prompt_tokens == explicit.usage.prompt_tokens
        assert templated.choices[0].message.content == explicit.choices[0].message.content
        alone = client.chat.completions.create(
            model="smollm2", max_tokens=1, temperature=0, messages=[],
            extra_body={"prompt_template": {"name": "ask", "variables": {"thing": "rain"},
                                            "role": "user"}})
        user_only = client.chat.completions.create(
            model="smollm2", max_tokens=1, temperature=0,
            messages=[{"role": "user", "content": "Answer briefly: what is rain?"}])
        assert alone.usage.prompt_tokens == user_only.usage.prompt_tokens
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="smollm2", prompt=None, max_tokens=1,
                                      extra_body={"prompt_template": {"name": "nope"}})
        assert info.value.body["code"] == "template_not_found"
    finally:
        client.close()


def test_render_limits_and_escapes_are_4xx_with_stable_codes(ferry):
    templates = {
        "needs": "Hello {{ who }}",
        "cyc": "{{ cycler('a', 'b').next() }}",
        "attr": "{{ ''|attr('__class__') }}",
        "indirect": "{% set k = '__cla' ~ 'ss__' %}{{ who[k] }}",
        "loud": "{% for i in range(100000) %}{% for j in range(100000) %}ab{% endfor %}"
                "{% endfor %}",
        "quiet": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                 "{% endfor %}",
        "huge": "{{ 'a' * 1000000000 }}",
        "pow": "{{ 9 ** 99999999 }}",
        "grow": "{{ who|replace('', who) }}",
    }
    for name, src in templates.items():
        _make(ferry, name, src)
    expect = {"needs": "template_render_error", "cyc": "template_render_error",
              "attr": "template_render_error", "indirect": "template_render_error",
              "loud": "template_output_too_large", "quiet": "template_render_error",
              "huge": "template_output_too_large", "pow": "template_render_error",
              "grow": "template_output_too_large"}
    for name, code in expect.items():
        variables = {} if name == "needs" else {"who": "x" * 2000}
        for path, body in (("/v1/completions", {"model": "smollm2", "max_tokens": 1}),
                           ("/v1/chat/completions", {"model": "smollm2", "max_tokens": 1})):
            status, _, reply = infer(ferry, path, {**body, "prompt_template": {
                "name": name, "variables": variables}})
            assert (status, error_code(reply)) == (400, code), (name, path, reply)
            assert "__class__" not in reply["error"]["message"] or name in ("attr", "indirect")
    assert infer(ferry, "/v1/completions", {"model": "smollm2", "max_tokens": 1,
                                            "prompt": "still serving"})[0] == 200


@pytest.mark.parametrize("spec,status,code", [
    ({"name": "missing"}, 404, "template_not_found"),
    ({"name": "needs", "version": 5}, 404, "template_not_found"),
    ("needs", 400, "template_render_error"),     # a bare name; `who` is undefined
    (5, 400, "invalid_parameter"),
    ([], 400, "invalid_parameter"),
    ({}, 400, "invalid_parameter"),
    ({"name": 5}, 400, "invalid_parameter"),
    ({"name": "../etc"}, 400, "invalid_input"),
    ({"name": "needs", "version": "1"}, 400, "invalid_parameter"),
    ({"name": "needs", "version": 0}, 400, "invalid_parameter"),
    ({"name": "needs", "version": True}, 400, "invalid_parameter"),
    ({"name": "needs", "variables": ["who"]}, 400, "invalid_parameter"),
    ({"name": "needs", "variables": {"who": "x" * 300000}}, 400, "invalid_parameter"),
    ({"name": "needs", "colour": "red"}, 400, "invalid_parameter"),
    ({"name": "needs", "variables": {"who": "a"}, "role": "tool"}, 400, "invalid_parameter"),
])
def test_bad_prompt_template_fields(ferry, spec, status, code):
    if admin(ferry, "GET", f"{BASE}/needs")[0] == 404:
        _make(ferry, "needs", "Hello {{ who }}")
    path = "/v1/chat/completions" if isinstance(spec, dict) and "role" in spec \
        else "/v1/completions"
    got, _, reply = infer(ferry, path, {"model": "smollm2", "max_tokens": 1,
                                        "messages": [], "prompt_template": spec})
    assert (got, error_code(reply)) == (status, code), reply
    assert reply["error"]["param"].startswith("prompt_template") or code == "invalid_input"


def test_prompt_and_prompt_template_are_exclusive(ferry):
    if admin(ferry, "GET", f"{BASE}/needs")[0] == 404:
        _make(ferry, "needs", "Hello {{ who }}")
    status, _, reply = infer(ferry, "/v1/completions", {
        "model": "smollm2", "prompt": "x", "max_tokens": 1,
        "prompt_template": {"name": "needs", "variables": {"who": "a"}}})
    assert (status, error_code(reply)) == (400, "invalid_parameter"), reply
