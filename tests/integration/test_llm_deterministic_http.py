"""`[llm] deterministic = true` through the OpenAI API on a real daemon serving SmolLM2 (int4 on
CPUs with bfloat16 instructions): the same greedy and seeded completion gives the same text and
logprobs on a prefix-cache miss, on a hit, and with 10 other requests running beside it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_proc import Daemon, orphan_segments

pytestmark = pytest.mark.timeout(300)

PROMPT = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps "
          "as his father had taught him, and at the top he")
OTHERS = ["Write a list of five fruits:", "The capital of France is", "def fibonacci(n):",
          "Once upon a time", "Water boils at", "The quick brown fox", "In 1969, the first",
          "Photosynthesis is the process", "A haiku about snow:", "The three laws of motion"]


@pytest.fixture(scope="module")
def ferry(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("repo")
    vdir = repo / "smollm2" / "1"
    vdir.mkdir(parents=True)
    for f in (demo_models / "smollm2" / "1").iterdir():
        if f.name != "model.toml":
            (vdir / f.name).symlink_to(f)
    toml = (demo_models / "smollm2" / "1" / "model.toml").read_text()
    assert toml.rstrip().splitlines()[-1].startswith("max_batched_tokens")   # [llm] is last
    (vdir / "model.toml").write_text(toml + "deterministic = true\n")
    d = Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=180)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


@pytest.fixture(scope="module")
def client(ferry):
    import openai
    c = openai.OpenAI(base_url=ferry.url + "/v1", api_key="x", max_retries=0, timeout=240)
    yield c
    c.close()


def _complete(client, prompt: str, **kw: Any) -> tuple[str, list[float], int]:
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, logprobs=1,
                                  extra_body={"ignore_eos": True}, **kw)
    cached = (r.usage.prompt_tokens_details.cached_tokens
              if r.usage.prompt_tokens_details else 0) or 0
    return r.choices[0].text, list(r.choices[0].logprobs.token_logprobs), cached


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_same_tokens_on_a_miss_a_hit_and_beside_others(client, sampling):
    prompt = f"Story {sampling['temperature']}. {PROMPT}"      # its own prefix per case
    text, logprobs, cached = _complete(client, prompt, **sampling)
    assert cached == 0, "the first call misses the prefix cache"
    again = _complete(client, prompt, **sampling)
    assert again[2] > 0, "the second call hits it"
    assert again[:2] == (text, logprobs)
    with ThreadPoolExecutor(len(OTHERS) + 1) as pool:
        others = [pool.submit(_complete, client, p, temperature=1.0) for p in OTHERS]
        beside = pool.submit(_complete, client, prompt, **sampling)
        assert beside.result()[:2] == (text, logprobs)
        assert all(len(o.result()[0]) > 0 for o in others)


@pytest.fixture(scope="module")
def plain(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo SmolLM2 in the default mode: only requests that ask are deterministic."""
    repo = tmp_path_factory.mktemp("plain")
    (repo / "smollm2").symlink_to(demo_models / "smollm2", target_is_directory=True)
    d = Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=180)
    import openai
    c = openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=240)
    yield c
    c.close()
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def test_the_per_request_flag_is_deterministic_on_a_default_model(plain):
    prompt = f"Flag. {PROMPT}"
    kw: dict[str, Any] = {"temperature": 0.8, "seed": 11}
    flag = {"ignore_eos": True, "deterministic": True}

    def complete(p: str, **extra: Any) -> tuple[str, list[float], int]:
        r = plain.completions.create(model="smollm2", prompt=p, max_tokens=12, logprobs=1,
                                     extra_body=flag, **kw, **extra)
        cached = (r.usage.prompt_tokens_details.cached_tokens
                  if r.usage.prompt_tokens_details else 0) or 0
        return r.choices[0].text, list(r.choices[0].logprobs.token_logprobs), cached
    text, logprobs, cached = complete(prompt)
    assert cached == 0
    again = complete(prompt)
    assert again[2] > 0 and again[:2] == (text, logprobs)
    with ThreadPoolExecutor(len(OTHERS) + 1) as pool:
        others = [pool.submit(_complete, plain, p, temperature=1.0) for p in OTHERS]
        assert pool.submit(complete, prompt).result()[:2] == (text, logprobs)
        assert all(len(o.result()[0]) > 0 for o in others)


def test_a_bad_deterministic_flag_is_a_400(plain):
    import openai
    with pytest.raises(openai.BadRequestError) as info:
        plain.completions.create(model="smollm2", prompt="hi", max_tokens=2,
                                 extra_body={"deterministic": "yes"})
    assert info.value.body["code"] == "invalid_parameter", info.value.body
