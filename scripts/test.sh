#!/usr/bin/env bash
# Install what is missing (test tools, Debian's chromium for the browser tests), then run every test:
# unit and reference tests, all notebooks, the browser tests, and the model layer under transformers 4.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k patching`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[test] installing Debian's chromium for the browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "[test] chromium is missing and cannot be installed here: browser tests will be skipped"
    fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/python -m pytest --durations=15 "$@"

# The model layer absorbs the transformers 4 / 5 differences: check it against transformers 4 too.
tf4=.cache/transformers4
if [ ! -d "$tf4/transformers" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --target "$tf4" \
        "transformers==4.57.6" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
fi
echo "[test] model layer under transformers $(PYTHONPATH=$tf4 .venv/bin/python -c 'import transformers; print(transformers.__version__)')"
PYTHONPATH="$tf4" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_models.py
