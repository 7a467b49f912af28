"""CUDA graphs for a quantized lm_head. vLLM runs the decoder inside its CUDA graphs but computes the logits eagerly
after them (`compute_logits`), so a quantized lm_head pays the host time of our ops at every decode step: on an H200
host ~200-270 µs to issue the guard + GEMM against ~25 µs for the bf16 head's one cuBLAS call, more than the int8
GEMV saves on the GPU (~115 µs) once the engine is host-bound (docs/benchmarks.md, session 29). So the head's eager
path is captured once per power-of-two row count at load; a call copies its rows in, replays, and copies the logits
out (three launches). Pure torch: the vLLM glue decides which layers get one."""

from __future__ import annotations

import os
from typing import Callable

import torch

# Largest row count captured (one graph per power of two up to it): the logits of a decode step have one row per
# sequence. The graphs hold their outputs: ~2x this many rows of logits (65 MB per 256 rows of a 128k vocabulary in
# bf16). Larger batches run the eager path, whose host time is small beside their GEMM.
LOGITS_GRAPH_MAX_ROWS = 256


def logits_graphs_enabled() -> bool:
    """OUTLIERTUNE_LOGITS_GRAPHS=0 runs a quantized lm_head eagerly (as vLLM's enforce_eager does)."""
    return os.environ.get("OUTLIERTUNE_LOGITS_GRAPHS", "1") != "0"


def graph_rows(rows: int) -> int:
    """The captured row count that serves `rows` rows: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class LogitsGraphs:
    """`run` (x [rows, in_features] of `dtype` -> out [rows, N]; rows independent) captured at 1, 2, 4, ... up to
    graph_rows(min(max_rows, LOGITS_GRAPH_MAX_ROWS)) rows. Calling it on x of `rows` rows gives run(x): x fills the
    first rows of that graph's input, the rows after them hold earlier inputs, whose outputs are not returned."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype,
                 device: torch.device, max_rows: int):
        self.dtype, self.in_features = dtype, in_features
        self.max_rows = graph_rows(max(1, min(max_rows, LOGITS_GRAPH_MAX_ROWS)))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        rows = 1
        while rows <= self.max_rows:
            static_in = torch.zeros(rows, in_features, dtype=dtype, device=device)
            run(static_in)  # compiles and allocates workspaces outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of the engine may touch CUDA meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                static_out = run(static_in)
            self._graphs[rows] = (graph, static_in, static_out)
            rows *= 2

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a graph serves x (not while a graph is being captured: then the plain ops are captured)."""
        return (x.is_cuda and x.dtype == self.dtype and x.dim() == 2 and x.shape[1] == self.in_features
                and 0 < x.shape[0] <= self.max_rows and not torch.cuda.is_current_stream_capturing())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        graph, static_in, static_out = self._graphs[graph_rows(x.shape[0])]
        static_in[: x.shape[0]].copy_(x)
        graph.replay()
        # A copy: the next replay rewrites static_out, and the caller may keep these logits longer than one step.
        return static_out[: x.shape[0]].clone()
