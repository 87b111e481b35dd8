#!/usr/bin/env bash
# Create .venv (when missing) and install the workbench into it, with the right PyTorch for this machine:
# a CUDA build when an NVIDIA GPU is present, else a CPU build (never gigabytes of CUDA packages on a CPU box).
# Usage: bash scripts/setup_env.sh [test]    ("test" adds the test tools). Safe to rerun: a no-op when current.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
torch_version="${WORKBENCH_TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
py=.venv/bin/python
pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)

stamp=".venv/.installed${extras:+-$extras}"
fingerprint="$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)"
current() { [ -f "$1" ] && [ "$(cat "$1")" = "$fingerprint" ]; }
# (an environment with the test tools holds everything the plain one needs)
if current "$stamp" || { [ -z "$extras" ] && current .venv/.installed-test; }; then
    exit 0
fi

# (torch's version from its metadata: importing torch before numpy is installed prints "Failed to initialize NumPy")
torch_installed() { "$py" -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null; }
if ! torch_installed >/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing torch $torch_version with CUDA"
        "${pip[@]}" install "torch==$torch_version"
    elif "${pip[@]}" install --no-index --no-deps "torch==$torch_version" 2>/dev/null; then
        echo "[setup] installed torch $torch_version from a local wheel (CPU)"
        "${pip[@]}" install "torch==$torch_version"
    else
        echo "[setup] no GPU: installing torch $torch_version, CPU build"
        "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu \
            --extra-index-url https://pypi.org/simple
    fi
fi
# Keep every later install on the torch we chose: nnsight does not pin torch and would pull a CUDA build.
echo "torch==$(torch_installed)" > .venv/constraints.txt
echo "[setup] installing the workbench${extras:+ with [$extras]} (constrained to $(cat .venv/constraints.txt))"
# constraints.txt holds the versions the tests passed on (scripts/lock.py), so a new release cannot break a fresh set-up.
"${pip[@]}" install -c .venv/constraints.txt -c constraints.txt -e ".${extras:+[$extras]}"
echo "$fingerprint" > "$stamp"
