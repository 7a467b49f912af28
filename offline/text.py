"""Text files to fixed token windows: the same windows feed calibration and both perplexity engines."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_outliertune.offline.model_io import UserError


def read_text(path: Path, what: str = "--text") -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found; pass a UTF-8 plain-text file "
                        f"(e.g. calib.txt / test.txt from `outliertune fetch brown DIR`)")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise UserError(f"{what} {path}: looks binary (NUL bytes); pass a UTF-8 plain-text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") \
            from None
    if not text.strip():
        raise UserError(f"{what} {path}: the file is empty; pass a file with text")
    return text


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None, source: str = "--text",
                  ) -> torch.Tensor:
    """Consecutive, non-overlapping windows of ``seq_len`` token ids (int64 [n, seq_len]) from the start of the
    text, tokenized without special tokens; at most ``max_windows``."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    ids = _token_ids(tokenizer, text, None if max_windows is None else max_windows * seq_len)
    count = len(ids) // seq_len
    if count == 0:
        raise UserError(f"{source}: the text has {len(ids)} tokens, shorter than one window of --seq-len {seq_len}; "
                        f"use a longer text or a smaller --seq-len")
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.tensor(ids[:count * seq_len], dtype=torch.long).view(count, seq_len)


# Tokens dropped at the end of a tokenized prefix: the cut may split a word, whose pieces then differ from the
# whole text's tokens; everything before the last few tokens is the same.
_PREFIX_MARGIN = 64


def _token_ids(tokenizer, text: str, needed: int | None) -> list[int]:
    """The ids of ``text`` tokenized without special tokens, or, when only ``needed`` tokens are used, of a prefix
    long enough to hold them (tokenizing a 5 MB calibration text for 128 windows took minutes on 2 cores)."""
    chars = 8 * needed if needed is not None else len(text)
    while chars < len(text):
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed + _PREFIX_MARGIN:
            return ids[:len(ids) - _PREFIX_MARGIN]
        chars *= 2
    return tokenizer(text, add_special_tokens=False)["input_ids"]
