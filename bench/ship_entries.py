"""Rebuild one GPU's entries of the shipped kernels/tile_configs.json from a tuner state file (every timing of
`outliertune tune`), e.g. after bench/tune_shipped.sh or after a change to how winners are chosen:

    python bench/ship_entries.py STATE.jsonl ["NVIDIA H200"] [--retimed LATER.jsonl ...]

Every shape the state holds for that device (and its shape-generic "default", and the small-M alternates that the
plugin times at load on an untuned shape, of both weight formats: re-run bench/ship_w4a8_small_m.py after it where
the W4A8 ones came from a W4A8 state of their own, as the H200's do) is replaced; other devices and shapes stay. A
--retimed state (a later run over some of the shapes, e.g. a re-time with another timing method) replaces the
entries it holds kernel by kernel and shape by shape; the shape-generic entries of the kernels it did not search in
full stay as STATE derives them. Prints, per shape, which kernel each M bucket now runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_outliertune.kernels import configs, tune


def main(state_path: str, device: str = "NVIDIA H200", retimed: list[str] = ()) -> None:
    state = tune.TuneState.load(Path(state_path))
    entries = tune.device_entries(state, device)
    for later in retimed:
        for kernel, per_shape in tune.device_entries(tune.TuneState.load(Path(later)), device).items():
            entries.setdefault(kernel, {}).update(per_shape)
    family = configs.load_table().get("families", {}).get(device)
    alternates = tune.device_alternates(state, device)
    tune.write_table(configs.TABLE_PATH, device, entries, family, alternates)
    for shape, per_m in sorted(entries["int8_gemm"].items()):
        owners = configs.owners_by_bucket({kernel: {int(m) for m in per_shape.get(shape, {})}
                                           for kernel, per_shape in entries.items()})
        print(f"{shape:18s} " + " ".join(f"{m}:{next(iter(configs.owners_at(owners, int(m))), 'int8_gemm')}"
                                         for m in per_m))
    print(f"wrote {len(entries['int8_gemm'])} shapes of {device!r} into {configs.TABLE_PATH}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state")
    parser.add_argument("device", nargs="?", default="NVIDIA H200")
    parser.add_argument("--retimed", nargs="+", default=[], help="later state files whose entries win")
    args = parser.parse_args()
    main(args.state, args.device, args.retimed)
