"""The widening of 4-bit codes into int8 levels, four to a 32-bit word, that the SCALED_LEVELS loops share: one
function source, compiled as a Triton function (kernels/w4a8_gemm.py, which the interpreter tests check) and as a
Gluon one (kernels/w4a8_wgmma.py, Hopper, which has no interpreter), so both widen with the same checked arithmetic.

A level (code - zero) * scale is inside int8 (the checkpoint format's rule), so level + 128 is a byte 0..255. For the
four codes of a word, sum_b (code_b * scale + 128 - zero * scale) * 256^b is then one multiply-add of the word,
codes * scale + offset with offset = (128 - zero * scale) * 0x01010101 mod 2^32: exact although the offset borrows
across bytes where zero * scale > 128, since every byte of the true sum is 0..255. An xor of each byte's top bit
takes the 128 back off. It needs code * scale <= 255 (the products' bytes carry into nothing:
format.levels_fit_bytes). Three integer instructions per four levels, where session 31's bytewise subtraction without
borrows took six."""

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401 (the interpreter patches it in the globals of the functions it runs)

try:
    from triton.experimental import gluon
except ImportError:  # a Triton without Gluon: kernels/w4a8_wgmma.py is not used
    gluon = None


def _level_words(codes, scale, offset):
    """uint32 codes [BLOCK_N, W] (four a word, a byte each), scale and offset [BLOCK_N] (uint32) -> the words of
    their int8 levels (code - zero) * scale, byte for byte."""
    return (codes * scale[:, None] + offset[:, None]) ^ 0x80808080


def _level_offset(scale, zero):
    """uint32 scale and zero [BLOCK_N] -> _level_words' offset: 128 - zero * scale in each byte, mod 2^32."""
    return (128 - zero * scale) * 0x01010101


level_words = triton.jit(_level_words)
level_offset = triton.jit(_level_offset)
gluon_level_words = gluon.jit(_level_words) if gluon is not None else None
gluon_level_offset = gluon.jit(_level_offset) if gluon is not None else None
