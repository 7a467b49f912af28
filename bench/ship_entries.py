"""Rebuild one GPU's entries of the shipped kernels/tile_configs.json from a tuner state file (every timing of
`outliertune tune`), e.g. after bench/tune_shipped.sh or after a change to how winners are chosen:

    python bench/ship_entries.py STATE.jsonl ["NVIDIA H200"]

Every shape the state holds for that device (and its shape-generic "default") is replaced; other devices and shapes
stay. Prints, per shape, which kernel each M bucket now runs."""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_outliertune.kernels import configs, tune


def main(state_path: str, device: str = "NVIDIA H200") -> None:
    state = tune.TuneState.load(Path(state_path))
    entries = tune.device_entries(state, device)
    family = configs.load_table().get("families", {}).get(device)
    tune.write_table(configs.TABLE_PATH, device, entries, family)
    for shape, per_m in sorted(entries["int8_gemm"].items()):
        owners = configs.owners_by_bucket({kernel: {int(m) for m in per_shape.get(shape, {})}
                                           for kernel, per_shape in entries.items()})
        print(f"{shape:18s} " + " ".join(f"{m}:{next(iter(configs.owners_at(owners, int(m))), 'int8_gemm')}"
                                         for m in per_m))
    print(f"wrote {len(entries['int8_gemm'])} shapes of {device!r} into {configs.TABLE_PATH}")


if __name__ == "__main__":
    main(*sys.argv[1:])
