#!/usr/bin/env bash
# Install what is missing, then open JupyterLab on the quickstart notebook (bundled demo model, works offline).
# The environment also has Voila, for the dashboard app: `.venv/bin/voila notebooks/dashboard.ipynb` (or `voila ...`
# in a JupyterLab terminal, which finds the environment's commands first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if ! .venv/bin/python -c "import voila" 2>/dev/null; then
    echo "[lab] installing Voila for the dashboard app"
    .venv/bin/python -m pip --quiet --disable-pip-version-check install -c .venv/constraints.txt -c constraints.txt voila
fi
# No "official Jupyter news" pop-up over the notebook: --LabApp.news_url=None stops fetching the news, but JupyterLab 4
# still asks whether to fetch it; this environment's default setting answers no (a user's own setting still wins).
.venv/bin/python -c '
import json
from pathlib import Path
from jupyterlab.commands import get_app_dir

path = Path(get_app_dir(), "settings", "overrides.d", "interp-workbench.json")
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps({"@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}}) + "\n")
'
export PATH="$PWD/.venv/bin:$PATH"  # a terminal in JupyterLab runs the environment's python, jupyter and voila
args=(--ServerApp.root_dir="$PWD" --LabApp.news_url=None)
[ "$(id -u)" = 0 ] && args+=(--allow-root)
exec .venv/bin/jupyter lab "${args[@]}" "$@" notebooks/00_quickstart.ipynb
