#!/usr/bin/env bash
# How the shipped H200 entries of kernels/tile_configs.json were tuned (GPU machine, repo root on PYTHONPATH, the
# GPU bundle's env.sh sourced for the CUTLASS backend). Resumable: re-running skips what the state file holds.
#   bash bench/tune_shipped.sh [TABLE]      # default: the user table ($OUTLIERTUNE_TILE_CONFIGS or ~/.cache/...)
# 1. Full search over a spread of shapes: Llama-3-8B at TP 1 and 2, and four shapes of other widths (Llama-3-70B
#    qkv/o at TP 8, Qwen2.5-7B gate_up at TP 1, Qwen2.5-32B down at TP 1): their tiles and the shape-generic
#    "default" entry (Qwen2.5-14B stays out of the spread: it is the check that an untuned shape keeps its speed).
# 2. Quick search (the family's known tiles + the spread's best) for the other models' per-rank shapes.
# 3. Copy the device's entries into the shipped table: python bench/ship_entries.py TABLE.state.jsonl "NVIDIA H200".
# The H200 timings behind the shipped entries: bench/tune_state_h200.jsonl.gz, and bench/tune_state_h200_graph.jsonl.gz
# (Llama-3-8B TP 1 / 2 shapes re-timed as CUDA-graph replays, plus the W4A8 kernels at TP 1), which wins shape by shape:
#   python bench/ship_entries.py tune_state_h200.jsonl --retimed tune_state_h200_graph.jsonl   (both gunzipped)
set -u
TABLE=${1:-${OUTLIERTUNE_TILE_CONFIGS:-$HOME/.cache/vllm-outliertune/tile_configs.json}}
REP=${REP_MS:-10}
tune() { python3 -m vllm_outliertune.cli tune "$@" --rep-ms "$REP" --out "$TABLE"; }
tune bench/configs/llama-3-8b.json --tp 1,2 --shapes 1280x8192,8192x1024,37888x3584,5120x27648 --search full
for model_tp in llama-3-8b:4,8 qwen2.5-7b:1,2,4 qwen2.5-14b:1,2,4,8 qwen2.5-32b:1,2,4,8 llama-3-70b:1,2,4,8 \
                qwen2.5-72b:1,2,4,8; do
  tune "bench/configs/${model_tp%%:*}.json" --tp "${model_tp#*:}" --search quick
done
