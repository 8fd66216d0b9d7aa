#!/usr/bin/env bash
# Set up peftlab in ./.venv: the pinned CPU PyTorch first (a plain "torch" requirement would pull gigabytes of
# CUDA wheels), then peftlab with its development extras. Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# pip, quiet, without this machine's "WARNING: Location ... is ignored" noise, keeping its exit status.
pip() {
    local log status=0
    log=$(mktemp)
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    return "$status"
}

stamp=.venv/.peftlab-setup
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import peftlab, torch" 2>/dev/null; then
    exit 0
fi
pip install --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[dev]"
.venv/bin/python -c "import peftlab, torch; print(f'peftlab {peftlab.__version__} ready (torch {torch.__version__})')"
echo "$want" > "$stamp"
