#!/usr/bin/env bash
# Install what is missing, then open JupyterLab on the quickstart notebook (bundled demo model, works offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
args=(--ServerApp.root_dir="$PWD" --LabApp.news_url=None)
[ "$(id -u)" = 0 ] && args+=(--allow-root)
exec .venv/bin/jupyter lab "${args[@]}" "$@" notebooks/00_quickstart.ipynb
