"""Open a Hugging Face model directory for quantization, with a clear error for every way it can be wrong (the
decoder-layer structure of each supported architecture is in offline/architectures.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vllm_outliertune import format as fmt
from vllm_outliertune.offline.architectures import ARCHITECTURES, SUPPORTED_ARCHITECTURES, Architecture

# Weights are read from safetensors only: pickle files (.bin/.pt/.pth) can run code when loaded.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# What is fetched of a hub repository: configs, safetensors weights, tokenizer files, custom-code modules (run
# only with --trust-remote-code); never pickle weights.
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# Where transformers looks for `auto_map`: classes to import from the model directory's own *.py files.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")


class UserError(Exception):
    """A problem with what the user gave us; the message names the file/argument and what to do."""


def read_json_object(path: Path) -> dict:
    """A model directory's JSON file that must hold an object (config.json, tokenizer_config.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore the model's {path.name}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; restore the model's {path.name}")
    return data


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, dict | None]:
    """A local model directory as given, or a hub id ORG/NAME resolved as transformers does (the Hugging Face
    cache; downloads unless HF_HUB_OFFLINE=1): (snapshot directory, {"repo_id", "revision": commit hash}). The
    architecture is checked from config.json before any weights are fetched."""
    if Path(model).exists() or not _REPO_ID.fullmatch(model):
        if revision is not None:
            raise UserError(f"--revision applies to a Hugging Face hub id (ORG/NAME), not to the directory {model}")
        return Path(model), None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config_path = Path(hf_hub_download(model, "config.json", revision=revision))
        check_architecture(read_json_object(config_path), f"{model} config.json")
        snapshot = Path(snapshot_download(model, revision=revision, allow_patterns=list(HUB_FILES)))
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise UserError(f"{model} is not a directory here, and as a Hugging Face hub id it could not be resolved "
                        f"({type(exc).__name__}: {exc}); pass a model directory, or a hub id that is in the "
                        f"Hugging Face cache (HF_HUB_OFFLINE=1) or can be downloaded") from None
    return snapshot, {"repo_id": model, "revision": snapshot.name}  # snapshot directories are named by commit


def read_config(model_dir: Path) -> dict:
    """config.json of ``model_dir``, checked to be a plain (not yet quantized) supported causal LM."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist (or is not a directory); pass the directory "
                        f"of a Hugging Face model (config.json + safetensors), e.g. from `outliertune fetch smollm2`")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory: {config_path} is missing")
    config = read_json_object(config_path)
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(path.name for pattern in PICKLE_PATTERNS for path in model_dir.glob(pattern))
        if pickles:
            raise UserError(f"{model_dir} has weights only as pickle files ({', '.join(pickles[:3])}); outliertune "
                            f"reads safetensors only (loading a pickle can run code). If you trust the file, convert "
                            f"it once with transformers: from_pretrained(...).save_pretrained(NEW_DIR)")
        raise UserError(f"{model_dir} has config.json but no weight files (*.safetensors); download the weights too")
    for path in sorted(model_dir.glob("*.safetensors")):  # an interrupted download fails here, not in transformers
        fmt.read_safetensors_layout(path, redo="download or copy the model again")
    return config


def check_device(device: str) -> None:
    """--device: cpu, or a CUDA device this torch can use."""
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available in this torch; use --device cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"--device {device}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")


def check_seq_len(config: dict, seq_len: int, model_dir: Path, option: str = "--seq-len", extra: int = 0) -> None:
    """Refuse windows longer than the model's positions, less ``extra`` positions the engine needs after a window
    (transformers would index past its position table or extrapolate RoPE silently; vLLM refuses with a
    traceback)."""
    limit = (config.get("text_config") or config).get("max_position_embeddings")
    if isinstance(limit, int) and seq_len + extra > limit:
        why = f", less {extra} for the token vLLM generates after each window" if extra else ""
        raise UserError(f"{option} {seq_len} is longer than {Path(model_dir) / 'config.json'} allows "
                        f"(max_position_embeddings {limit}{why}); use {option} {limit - extra} or less")


def read_auto_maps(model_dir: Path, files: tuple[str, ...] = AUTO_MAP_FILES) -> dict[str, dict]:
    """{file name: its auto_map} for each of ``files`` in ``model_dir`` that names custom code."""
    auto_maps = {}
    for name in files:
        path = Path(model_dir) / name
        auto_map = read_json_object(path).get("auto_map") if path.is_file() else None
        if auto_map and not isinstance(auto_map, dict):
            raise UserError(f"{path}: auto_map must be an object ({{\"AutoClass\": \"module.Class\"}}), got "
                            f"{auto_map!r}; restore the model's {name}")
        if auto_map:
            auto_maps[name] = auto_map
    return auto_maps


def check_remote_code(model_dir: Path, trust_remote_code: bool, files: tuple[str, ...] = AUTO_MAP_FILES) -> None:
    """Refuse a model directory whose ``files`` name custom code (auto_map) unless --trust-remote-code was given."""
    untrusted = [] if trust_remote_code else list(read_auto_maps(model_dir, files))
    if untrusted:
        raise UserError(f"{Path(model_dir) / untrusted[0]} needs custom code from the model directory (auto_map); it is not "
                        f"run unless you pass --trust-remote-code (only do so if you trust its source)")


def check_quantizable(config: dict, model_dir: Path, trust_remote_code: bool) -> None:
    where = Path(model_dir) / "config.json"
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UserError(f"{where} says the model is already quantized (quant_method {method!r}); "
                        f"pass the original fp16/bf16/fp32 model directory")
    # Only the model's custom code is refused here: a custom tokenizer class is loaded only when trusted, otherwise
    # transformers falls back to the built-in class its files name.
    check_remote_code(model_dir, trust_remote_code, files=("config.json",))
    check_architecture(config, where)


def check_architecture(config: dict, where: Path | str) -> Architecture:
    """The config's supported architecture; else one error naming it and listing the supported ones, before
    anything is loaded."""
    architectures = config.get("architectures") or []
    supported = [name for name in architectures if name in ARCHITECTURES]
    if not supported:
        raise UserError(f"{where}: architecture {', '.join(architectures) or '(none given)'} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    reason = ARCHITECTURES[supported[0]].check(config)
    if reason:
        raise UserError(f"{where}: {supported[0]} with {reason}; this variant is not supported")
    return ARCHITECTURES[supported[0]]


def load_model(model_dir: Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """(model, config dict) on the CPU in the checkpoint's dtype (or ``dtype``), eval mode."""
    from transformers import AutoModelForCausalLM

    config = read_config(model_dir)
    check_quantizable(config, model_dir, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto", use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the model in {model_dir}: {exc}") from None
    return model.eval(), config


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The tokenizer of ``model_dir``; its custom code (tokenizer_config.json auto_map) runs only when trusted,
    otherwise transformers falls back to the built-in class the files name."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load a tokenizer from {model_dir} ({exc}); the model directory needs its "
                        f"tokenizer files (tokenizer.json / tokenizer_config.json)") from None


def is_outliertune_checkpoint(config: dict) -> bool:
    quant = config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == fmt.QUANT_METHOD
