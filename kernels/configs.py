"""Tile configurations as data: tile_configs.json next to this file, written by `python -m
vllm_outliertune.kernels.tune`.

Layout (gemlite / vLLM style): {"devices": {DEVICE: {KERNEL: {SHAPE: {M_BUCKET: CONFIG}}}}} where
- DEVICE is torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3"), else "sm{major}{minor}", else "default";
- KERNEL is "int8_gemm", "splitk_gemm" (small M) or "int8_gemm_tma" (large M, Hopper);
- SHAPE is "N=<n>,K=<k>" for tuned shapes, else "default";
- M_BUCKET is a power of two as a string; a call with M rows uses the smallest bucket >= M (else the largest);
- CONFIG holds the block sizes and launch options, e.g. {"BLOCK_M": 128, ..., "num_warps": 8, "num_stages": 4}.
The first level that has the kernel wins, so a device entry may list only tuned shapes and fall back to "default".
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

TABLE_PATH = Path(__file__).with_name("tile_configs.json")
KERNELS = ("int8_gemm", "splitk_gemm", "int8_gemm_tma")  # the table's kernel keys (tune.py tunes these)


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict[str, Any]:
    with open(path) as f:
        table = json.load(f)
    if "devices" not in table or "default" not in table["devices"]:
        raise ValueError(f"{path}: tile table needs a 'devices' mapping with a 'default' entry; "
                         "regenerate it with `python -m vllm_outliertune.kernels.tune`")
    return table


def shape_key(n: int, k: int) -> str:
    return f"N={n},K={k}"


def m_bucket(m: int, buckets: list[int]) -> int:
    """Smallest bucket >= m, else the largest."""
    fitting = [b for b in buckets if b >= m]
    return min(fitting) if fitting else max(buckets)


def device_keys(device: torch.device | None) -> tuple[str, ...]:
    """Most to least specific table keys for `device` (CPU / interpreter: only "default")."""
    if device is None or device.type != "cuda":
        return ("default",)
    return _cuda_device_keys(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device_keys(index: int) -> tuple[str, ...]:  # cached: the driver queries cost µs on every call
    major, minor = torch.cuda.get_device_capability(index)
    return (torch.cuda.get_device_name(index), f"sm{major}{minor}", "default")


@functools.lru_cache(maxsize=4096)
def _per_m(kernel: str, keys: tuple[str, ...], n: int, k: int) -> dict[str, Any]:
    devices = load_table()["devices"]
    for key in keys:
        per_shape = devices.get(key, {}).get(kernel)
        if not per_shape:
            continue
        # A tuned shape may list no buckets at all (e.g. the split-K kernel never wins there): that is an answer.
        per_m = per_shape[shape_key(n, k)] if shape_key(n, k) in per_shape else per_shape.get("default")
        if per_m is not None:
            return per_m
    raise KeyError(f"{TABLE_PATH}: no '{kernel}' configuration for devices {list(keys)}; "
                   "add a 'default' entry or re-run `python -m vllm_outliertune.kernels.tune`")


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


@functools.lru_cache(maxsize=4096)
def listed_m_range(kernel: str, n: int, k: int, keys: tuple[str, ...]) -> tuple[int, int] | None:
    """The smallest and largest M bucket the table lists for `kernel` at this shape (None: none, or no entry).
    The dispatch uses the split-K kernel up to the largest bucket and the TMA GEMM from the smallest one."""
    buckets = listed_buckets(kernel, n, k, keys)
    return (min(buckets), max(buckets)) if buckets else None
