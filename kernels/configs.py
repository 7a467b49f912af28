"""Tile configurations as data: the tile_configs.json shipped next to this file, and a user table written by
`outliertune tune` that is preferred over it.

Layout (gemlite / vLLM style): {"devices": {DEVICE: {KERNEL: {SHAPE: {M_BUCKET: CONFIG}}}}, "families": {DEVICE:
FAMILY}} where
- DEVICE is torch.cuda.get_device_name() (e.g. "NVIDIA H200"), a chip family "sm{major}{minor}", or "default";
- FAMILY ("families") is the chip family a named device belongs to (e.g. "sm90" for H100 / H200 / H800 / GH200);
- KERNEL is "int8_gemm", "splitk_gemm" (small M), "int8_gemm_tma" (large M, Hopper) or an external backend such as
  "cutlass_scaled_mm" (kernels/linear.py dispatches to it only where it is registered); for packed 4-bit weights
  "w4a8_splitk" (small M), "w4a8_unpack" (large M: levels widened once, then the int8 GEMM's dispatch) and
  "w4a8_gemm" (the rest; `outliertune tune --w4a8` tunes them);
- SHAPE is "N=<n>,K=<k>" for tuned shapes (per tensor-parallel rank), else "default": tiles that were tuned over a
  spread of shapes and serve shapes no entry lists;
- M_BUCKET is a power of two as a string; a call with M rows uses the smallest bucket >= M (else the largest);
- CONFIG holds the block sizes and launch options, e.g. {"BLOCK_M": 128, ..., "num_warps": 8, "num_stages": 4}.

Lookup of a shape, per weight format (int8 kernels, W4A8 kernels): the first of this device's name, the other
devices of its chip family, the family key and "default" that tuned the shape for that format serves all the
format's kernels; where none did, the first of them with shape-generic ("default") entries. The user table (environment variable OUTLIERTUNE_TILE_CONFIGS, else
~/.cache/vllm-outliertune/tile_configs.json) replaces the shipped table's entries shape by shape.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

TABLE_PATH = Path(__file__).with_name("tile_configs.json")
USER_TABLE_ENV = "OUTLIERTUNE_TILE_CONFIGS"
USER_TABLE_PATH = Path.home() / ".cache" / "vllm-outliertune" / "tile_configs.json"
KERNELS = ("int8_gemm", "splitk_gemm", "int8_gemm_tma")  # the Triton kernels of the table (tune.py tunes these)
EXTERNAL_KERNELS = ("cutlass_scaled_mm",)  # GEMMs of other libraries the table may pick (linear.py registers them)
W4A8_KERNELS = ("w4a8_splitk", "w4a8_gemm", "w4a8_unpack")  # packed 4-bit weights (small M, the rest, large M)
# Per weight format, the fallback kernel (listed at every bucket, runs every shape) and who runs a bucket that
# several other kernels list (the tuner lists each bucket's winner only, plus the fallback everywhere; older tables
# list split-K from M = 1 up and TMA / CUTLASS from the largest M down).
DISPATCH_ORDER = {"int8_gemm": ("splitk_gemm", *EXTERNAL_KERNELS, "int8_gemm_tma"),
                  "w4a8_gemm": ("w4a8_splitk", "w4a8_unpack")}


def user_table_path() -> Path:
    """Where `outliertune tune` writes by default and the plugin looks for a user table."""
    return Path(os.environ.get(USER_TABLE_ENV) or USER_TABLE_PATH).expanduser()


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict[str, Any]:
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table.get("devices"), dict):
        raise ValueError(f"{path}: tile table needs a 'devices' mapping; regenerate it with `outliertune tune`")
    return table


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with every (device, kernel, shape) entry that `override` lists replaced by the override's."""
    devices = {device: {kernel: dict(per_shape) for kernel, per_shape in kernels.items()}
               for device, kernels in base["devices"].items()}
    for device, kernels in override["devices"].items():
        for kernel, per_shape in kernels.items():
            devices.setdefault(device, {}).setdefault(kernel, {}).update(per_shape)
    return {**base, "devices": devices, "families": base.get("families", {}) | override.get("families", {}),
            "alternates": base.get("alternates", {}) | override.get("alternates", {})}


@functools.lru_cache(maxsize=None)
def effective_table() -> dict[str, Any]:
    """The shipped table, with the user table's entries (if that file exists) in front."""
    shipped = load_table()
    if "default" not in shipped["devices"]:
        raise ValueError(f"{TABLE_PATH}: the shipped tile table needs a 'default' device entry")
    user = user_table_path()
    return merge_tables(shipped, load_table(str(user))) if user.is_file() else shipped


def clear_caches() -> None:
    """Forget the loaded tables and lookups (after the user table or its environment variable changed)."""
    for cached in (load_table, effective_table, lookup_order, _per_m, kernels_by_bucket):
        cached.cache_clear()


def shape_key(n: int, k: int) -> str:
    return f"N={n},K={k}"


def shape_of(key: str) -> tuple[int, int]:
    """(n, k) of a shape key; (0, 0), a shape no entry lists, for "default"."""
    if key == "default":
        return 0, 0
    n, k = (int(part.split("=")[1]) for part in key.split(","))
    return n, k


def by_bucket(per_m: dict[str, Any]) -> dict[str, Any]:
    """An entry's {M bucket: value} in ascending bucket order (buckets are string keys in the table's JSON)."""
    return dict(sorted(per_m.items(), key=lambda item: int(item[0])))


def m_bucket(m: int, buckets: list[int]) -> int:
    """Smallest bucket >= m, else the largest."""
    fitting = [b for b in buckets if b >= m]
    return min(fitting) if fitting else max(buckets)


def device_keys(device: torch.device | None) -> tuple[str, ...]:
    """(device name, chip family, "default") for a CUDA device; CPU / interpreter: only "default"."""
    if device is None or device.type != "cuda":
        return ("default",)
    return _cuda_device_keys(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device_keys(index: int) -> tuple[str, ...]:  # cached: the driver queries cost µs on every call
    major, minor = torch.cuda.get_device_capability(index)
    return (torch.cuda.get_device_name(index), f"sm{major}{minor}", "default")


@functools.lru_cache(maxsize=None)
def lookup_order(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The table's device keys to search, most specific first: the device name, the other named devices of its
    family (as the table's "families" records them), the family key, "default"."""
    families = effective_table().get("families", {})
    siblings = tuple(device for device, family in families.items() if family in keys and device not in keys)
    return (*keys[:1], *siblings, *keys[1:])


def find_entry(kernel: str, keys: tuple[str, ...], n: int, k: int, skip: str | None = None
               ) -> tuple[str, str] | None:
    """(device key, shape key) of the entry that serves `kernel` at this shape, or None. The first device (in
    lookup_order) that lists the shape for a kernel of `kernel`'s weight format serves all that format's kernels,
    so one GPU's measurements decide the format's whole dispatch; where no device lists it, the first one with
    shape-generic ("default") entries does. A kernel that device does not list is not used there, except each
    format's fallback (int8_gemm, w4a8_gemm), which serves every shape: it falls back to the next level. skip: a
    device key left out (what the shape would run without that GPU's entries)."""
    devices = effective_table()["devices"]
    order = [device for device in lookup_order(keys) if device != skip]
    packed = kernel in W4A8_KERNELS
    fallback, format_kernels = ("w4a8_gemm", W4A8_KERNELS) if packed else ("int8_gemm", KERNELS + EXTERNAL_KERNELS)
    for shape in (shape_key(n, k), "default"):
        owner = next((device for device in order
                      if any(shape in devices.get(device, {}).get(name, {}) for name in format_kernels)), None)
        if owner is None:
            continue
        if shape in devices[owner].get(kernel, {}):
            return owner, shape
        if kernel != fallback:
            return None
    return next(((device, "default") for device in order if "default" in devices.get(device, {}).get(kernel, {})),
                None)


@functools.lru_cache(maxsize=4096)
def _per_m(kernel: str, keys: tuple[str, ...], n: int, k: int) -> dict[str, Any]:
    entry = find_entry(kernel, keys, n, k)
    if entry is None:
        raise KeyError(f"no '{kernel}' tile configuration for devices {list(keys)} in {TABLE_PATH} or "
                       f"{user_table_path()}; add a 'default' entry or run `outliertune tune`")
    # A tuned shape may list no buckets at all (e.g. the split-K kernel never wins there): that is an answer.
    device, shape = entry
    return effective_table()["devices"][device][kernel][shape]


def table_keys(device: torch.device | None) -> tuple[str, ...]:
    """The table keys to look `device` up by (the interpreter uses the portable default tiles)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        device = None
    return device_keys(device)


def get_config(kernel: str, m: int, n: int, k: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """The tile configuration for `kernel` at this problem size for the device `keys` (table_keys) name; a fresh
    dict: callers may edit it."""
    per_m = _per_m(kernel, keys, n, k)
    return dict(per_m[str(m_bucket(m, [int(b) for b in per_m]))])


def listed_buckets(kernel: str, n: int, k: int, keys: tuple[str, ...]) -> list[int]:
    """The M buckets the table lists for `kernel` at this shape (none where it has no entry)."""
    try:
        return [int(b) for b in _per_m(kernel, keys, n, k)]
    except KeyError:
        return []


Owners = tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]


def owners_by_bucket(listed: dict[str, set[int]], fallback: str = "int8_gemm") -> Owners:
    """(every bucket any kernel lists, ascending; for each, the kernels of DISPATCH_ORDER[fallback] listing it, in
    that order)."""
    order = DISPATCH_ORDER[fallback]
    buckets = tuple(sorted(set().union(*(listed.get(kernel, set()) for kernel in (fallback, *order)))))
    return buckets, tuple(tuple(kernel for kernel in order if b in listed.get(kernel, ())) for b in buckets)


def owners_at(owners: Owners, m: int) -> tuple[str, ...]:
    """The kernels listing M's bucket: the smallest listed bucket >= M, else the largest. Empty: the fallback."""
    buckets, kernels = owners
    return kernels[min(bisect.bisect_left(buckets, m), len(buckets) - 1)] if buckets else ()


@functools.lru_cache(maxsize=4096)
def kernels_by_bucket(n: int, k: int, keys: tuple[str, ...], fallback: str = "int8_gemm") -> Owners:
    return owners_by_bucket({kernel: set(listed_buckets(kernel, n, k, keys))
                             for kernel in (fallback, *DISPATCH_ORDER[fallback])}, fallback)


def kernels_for(m: int, n: int, k: int, keys: tuple[str, ...], fallback: str = "int8_gemm") -> tuple[str, ...]:
    """The kernels the table chose for M rows of this shape and weight format (named by its fallback kernel), in
    dispatch order (owners_at)."""
    return owners_at(kernels_by_bucket(n, k, keys, fallback), m)


def alternates(keys: tuple[str, ...]) -> dict[str, list]:
    """{bucket: [[kernel, config], ...]}: the small-M choices to time at load on a shape no table tuned
    (tune.generic_alternates), of the first device in lookup_order whose table has them; {} where none has."""
    table = effective_table().get("alternates", {})
    return next((table[device] for device in lookup_order(keys) if device in table), {})


def add_shape_entries(device_key: str, n: int, k: int, per_kernel: dict[str, dict[str, dict]]) -> None:
    """Serve shape (n, k) from per_kernel ({kernel: {bucket: config}}) under `device_key` for the rest of this
    process, in front of the tables (the load-time choice for an untuned shape; clear_caches forgets it)."""
    devices = effective_table()["devices"]
    for kernel, per_m in per_kernel.items():
        devices.setdefault(device_key, {}).setdefault(kernel, {})[shape_key(n, k)] = per_m
    for cached in (_per_m, kernels_by_bucket):
        cached.cache_clear()


def tile_source(n: int, k: int, keys: tuple[str, ...], fallback: str = "int8_gemm") -> str | None:
    """None where this device's own entry lists the shape (tuned here) for the weight format of `fallback`
    (int8_gemm, w4a8_gemm), else where its tiles come from, e.g. "NVIDIA H100 80GB HBM3 (same chip family)" or
    "the generic sm90 tiles of NVIDIA H200"."""
    entry = find_entry(fallback, keys, n, k)
    if entry is None:
        return "no entry"
    device, shape = entry
    if shape == "default":
        return f"the shape-generic tiles of {device!r}"
    return None if device == keys[0] else f"tiles tuned on {device!r}"
