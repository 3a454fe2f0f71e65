#!/usr/bin/env bash
# Creates .venv and installs mbatch with its worker and test extras.
# torch goes in first, on its own, so that its CPU build is used where that is the one offered
# and no CUDA packages are pulled in by a later, looser requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[worker,test]"
