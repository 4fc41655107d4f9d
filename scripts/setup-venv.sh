#!/usr/bin/env bash
# Create .venv and install tdiag into it (editable, with the dev extras).
# A second run does nothing unless pyproject.toml changed.
#
# PyTorch: users bring their own build, so pyproject.toml only asks for "torch>=2.2".
# On a machine without an NVIDIA GPU we install a CPU build first, so that pip does not
# pull a multi-GB CUDA build: TORCH_CPU_SPEC (default torch==2.13.0, a CPU wheel that
# lies on this kind of machine's disk). On a machine with a GPU (nvidia-smi works) the
# choice is left to pip's default. Override with TORCH_SPEC="torch==X.Y" to force one.
#
# Each stage prints one line when it starts and one with its time when it ends (a fresh
# set-up takes minutes: pip is quiet, so these lines are what shows it is working);
# SETUP_VERBOSE=1 shows pip's own output and progress bars instead.
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
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
SETUP_T0=$SECONDS
pip_install() {  # pip, minus the noise of this machine's unused local index entries
  local log rc=0 t0=$SECONDS
  if [ -n "${SETUP_VERBOSE:-}" ]; then
    "${PIP[@]}" install "$@" || rc=$?
  else
    log=$(mktemp)
    "${PIP[@]}" -q install "$@" >"$log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
  fi
  if [ "$rc" -eq 0 ]; then
    echo "   done in $((SECONDS - t0)) s"
  else
    echo "   failed after $((SECONDS - t0)) s (pip exit status $rc; SETUP_VERBOSE=1 shows pip's output)" >&2
  fi
  return "$rc"
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo ">> [1/2] installing $TORCH_SPEC (the largest download: minutes on a fresh machine)"
    pip_install "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo ">> [1/2] GPU found: installing torch with pip's default (CUDA) build (a few GB: minutes)"
    pip_install "torch>=2.2"
  else
    spec="${TORCH_CPU_SPEC:-torch==2.13.0}"
    echo ">> [1/2] no GPU: installing the CPU build of PyTorch ($spec)"
    pip_install "$spec"
  fi
fi

echo ">> [2/2] installing tdiag[$EXTRAS] (editable) and its dependencies (all extras: ~100 packages, minutes on a fresh machine)"
pip_install -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import tdiag, torch; print('>> tdiag', tdiag.__version__, 'torch', torch.__version__)"
echo ">> set-up done in $((SECONDS - SETUP_T0)) s ($VENV; a second run skips it)"
echo "$EXTRAS" > "$STAMP"
