#!/usr/bin/env bash
# Create .venv and install tdiag into it (editable, with the dev extras).
# A second run does nothing unless pyproject.toml changed.
#
# PyTorch: users bring their own build, so pyproject.toml only asks for "torch>=2.2".
# On a machine without an NVIDIA GPU we install a CPU build first, so that pip does not
# pull a multi-GB CUDA build: TORCH_CPU_SPEC (default torch==2.13.0, a CPU wheel that
# lies on this kind of machine's disk). On a machine with a GPU (nvidia-smi works) the
# choice is left to pip's default. Override with TORCH_SPEC="torch==X.Y" to force one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev,wandb,gpu,hf,lightning}"
STAMP="$VENV/.tdiag-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ -x "$VENV/bin/python" ] \
   && [ "$(cat "$STAMP")" = "$EXTRAS" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
pip_install() {  # pip, minus the noise of this machine's unused local index entries
  local log rc=0
  log=$(mktemp)
  "${PIP[@]}" install "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo ">> installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo ">> GPU found: installing torch with pip's default (CUDA) build"
    pip_install "torch>=2.2"
  else
    spec="${TORCH_CPU_SPEC:-torch==2.13.0}"
    echo ">> no GPU: installing the CPU build of PyTorch ($spec)"
    pip_install "$spec"
  fi
fi

echo ">> installing tdiag[$EXTRAS] (editable)"
pip_install -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import tdiag, torch; print('>> tdiag', tdiag.__version__, 'torch', torch.__version__)"
echo "$EXTRAS" > "$STAMP"
