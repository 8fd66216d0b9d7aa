#!/usr/bin/env bash
# Set up peftlab in ./.venv: the pinned CPU PyTorch first (a plain "torch" requirement would pull gigabytes of
# CUDA wheels), then peftlab with its development extras at the versions in requirements/lock.txt, the versions the
# test suite passed with, so this gives the same environment next month. Safe to run again: it skips what is done.
#
#   bash scripts/setup.sh                      the locked environment in .venv
#   PEFTLAB_LATEST=1 bash scripts/setup.sh     the newest releases instead, in .venv-latest (then run its pytest)
#   TORCH_SPEC='torch==2.13.0' VENV=dir PYTHON=python3.12 bash scripts/setup.sh   another torch, folder or Python
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LATEST=${PEFTLAB_LATEST:-0}
LOCK=requirements/lock.txt
if [ "$LATEST" = 1 ]; then
    VENV=${VENV:-.venv-latest}
    constraints=()
else
    VENV=${VENV:-.venv}
    constraints=(-c "$LOCK")
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip, quiet, without this machine's "WARNING: Location ... is ignored" noise, keeping its exit status.
pip() {
    local log status=0
    log=$(mktemp)
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    return "$status"
}

stamp="$VENV/.peftlab-setup"
want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16) $TORCH_SPEC latest=$LATEST"
if [ "$LATEST" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$VENV/bin/python" -c "import peftlab, torch" 2>/dev/null; then
    exit 0
fi
pip install --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
# torch stays the build installed above in both modes (an upgrade would pull a CUDA build of several GB).
keep_torch=$(mktemp)
"$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > "$keep_torch"
if [ "$LATEST" = 1 ]; then
    pip install -c "$keep_torch" --upgrade --upgrade-strategy eager -e ".[dev]"
else
    pip install -c "$keep_torch" "${constraints[@]}" -e ".[dev]"
fi
rm -f "$keep_torch"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import peftlab
import torch

names = ("transformers", "peft", "datasets", "huggingface-hub")
print(f"peftlab {peftlab.__version__} ready (torch {torch.__version__}, "
      + ", ".join(f"{n} {md.version(n)}" for n in names) + ")")
PY
echo "$want" > "$stamp"
