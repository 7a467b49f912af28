"""Integer kernels for OutlierTune (Triton on CUDA, exact torch elsewhere). No vLLM imports here."""
