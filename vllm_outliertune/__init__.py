"""vLLM plugin for OutlierTune checkpoints (static per-channel activation quantization, W8A8 / W6A6)."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the `vllm.general_plugins` group: registers the "outliertune" quantization method and, where
    vLLM's CUDA build has it, CUTLASS as a GEMM backend the tile table can pick. Idempotent (vLLM calls it in every
    process it starts)."""
    from vllm_outliertune import cutlass
    from vllm_outliertune.config import register_with_vllm

    register_with_vllm()
    cutlass.register()
