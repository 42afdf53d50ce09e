#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: PyTorch (only if no suitable one is present),
# then liptorch itself with its test dependencies.  Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" - <<'PYEOF' 2>/dev/null
import sys
import torch
major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 3) else 1)
PYEOF
then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"
# Real data for the Fashion-MNIST tests and benchmarks, when this is a Debian machine on which
# we may install packages.  Best effort: without it those tests skip and say why.
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing the Debian package dataset-fashion-mnist"
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: dataset-fashion-mnist not installed; the Fashion-MNIST tests will skip"
fi
