"""Offline OutlierTune: calibration, symmetrization, folding, weight quantization, checkpoint writing, and the
torch reference model. Needs torch + transformers only (no vLLM)."""
