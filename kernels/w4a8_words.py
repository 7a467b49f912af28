"""The GPU layout of a packed 4-bit weight: 32-bit words of 8 consecutive input channels per output row.

The checkpoint stores two codes per byte (vllm_outliertune.format.pack_int4: channel 2j low nibble, 2j + 1 high).
On the GPU the plugin regroups them at load into int32 words [N, ceil(K / 8)]: word j of row n holds channels
8j .. 8j + 7, byte b (bits 8b .. 8b + 7) channel 8j + b in its low nibble and 8j + 4 + b in its high one. So
``word & 0x0F0F0F0F`` are the codes of channels 8j .. 8j + 3 as four bytes and ``(word >> 4) & 0x0F0F0F0F`` those
of 8j + 4 .. 8j + 7: each meets the activation word of the same four channels in one dp4a, 8 weights in ~5 integer
instructions (the byte layout needed ~16). Pure torch: the reference and the plugin use it without Triton."""

from __future__ import annotations

import torch

from vllm_outliertune.format import unpack_int4

CHANNELS_PER_WORD = 8
_SHIFTS = torch.tensor([8 * b + 4 * half for half in (0, 1) for b in range(4)])  # channel 8j + c at bits _SHIFTS[c]


def pack_words(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] (checkpoint layout) -> int32 words [N, ceil(K/8)], row-major; channels past K get code
    0 (their activations are zero wherever the kernels read them)."""
    codes = unpack_int4(packed, in_features)
    words = -(-in_features // CHANNELS_PER_WORD)
    codes = torch.nn.functional.pad(codes, (0, words * CHANNELS_PER_WORD - in_features))
    codes = codes.view(packed.shape[0], words, 2, 4)  # [n, word, half, byte]
    return (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(packed.shape[0], words * 4).view(torch.int32)


def word_codes(words: torch.Tensor, in_features: int) -> torch.Tensor:
    """pack_words' inverse: int32 words [N, W] (any strides) -> uint8 codes [N, in_features]."""
    shifts = _SHIFTS.to(words.device)
    codes = (words.to(torch.int64)[:, :, None] >> shifts) & 0xF
    return codes.reshape(words.shape[0], -1)[:, :in_features].to(torch.uint8)
