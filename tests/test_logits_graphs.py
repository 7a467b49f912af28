"""The quantized lm_head's own CUDA graphs (vllm_outliertune/logits_graphs.py): which graph serves how many rows, and
on a GPU that a replay gives the eager ops' logits bit for bit."""

from __future__ import annotations

import pytest
import torch

from vllm_outliertune.logits_graphs import LOGITS_GRAPH_MAX_ROWS, LogitsGraphs, graph_rows, logits_graphs_enabled


def test_graph_rows_are_the_next_power_of_two():
    assert [graph_rows(rows) for rows in (1, 2, 3, 4, 5, 17, 64, 65, 256)] == [1, 2, 4, 4, 8, 32, 64, 128, 256]


def test_logits_graphs_switch(monkeypatch):
    monkeypatch.delenv("OUTLIERTUNE_LOGITS_GRAPHS", raising=False)
    assert logits_graphs_enabled()
    monkeypatch.setenv("OUTLIERTUNE_LOGITS_GRAPHS", "0")
    assert not logits_graphs_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_logits_graphs_replay_the_eager_head():
    from vllm_outliertune.kernels import linear as kernel_ops

    gen = torch.Generator().manual_seed(0)
    k, n = 328, 1000  # K not a multiple of 64, odd N
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).cuda()
    weight_scale = (torch.rand(n, generator=gen) * 1e-3).cuda()
    output_bias = torch.randn(n, generator=gen).cuda()
    inv_scale = (torch.rand(k, generator=gen) + 0.5).cuda()
    shift = (0.1 * torch.randn(k, generator=gen)).cuda()

    def head(x: torch.Tensor) -> torch.Tensor:  # the LinearMethod's eager path with the token guard
        codes, t = kernel_ops.quantize_activation_guarded(x, inv_scale, shift, 8, 1.0)
        return kernel_ops.int8_gemm(codes, weight, weight_scale, output_bias, torch.bfloat16, t)

    graphs = LogitsGraphs(head, k, torch.bfloat16, torch.device("cuda"), max_rows=20)
    assert graphs.max_rows == 32
    kept = []
    # 17 then 5 and 3 rows: the later calls' padding rows hold the earlier inputs; 32 fills its graph exactly.
    for rows in (1, 17, 5, 3, 32, 2):
        x = (4 * torch.randn(rows, k, generator=gen)).to(torch.bfloat16).cuda()
        x[0, 0] = 1e4  # one row beyond the plan's range: the guard rescales it
        assert graphs.takes(x)
        out = graphs(x)
        assert torch.equal(out, head(x)), rows
        kept.append((out, out.clone()))
    assert all(torch.equal(out, copy) for out, copy in kept), "a later replay changed logits already returned"
    assert not graphs.takes(torch.zeros(33, k, dtype=torch.bfloat16, device="cuda"))
    assert not graphs.takes(torch.zeros(1, k, dtype=torch.float16, device="cuda"))
    assert not graphs.takes(torch.zeros(1, k + 1, dtype=torch.bfloat16, device="cuda"))
    assert not graphs.takes(torch.zeros(1, k, dtype=torch.bfloat16))
    assert LogitsGraphs(head, k, torch.bfloat16, torch.device("cuda"), max_rows=4096).max_rows \
        == LOGITS_GRAPH_MAX_ROWS
