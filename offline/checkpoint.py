"""Write an OutlierTune checkpoint directory atomically: everything goes to a temporary directory next to OUT_DIR,
which replaces OUT_DIR only once complete (an interrupted or failed write leaves the previous OUT_DIR, or nothing)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from vllm_outliertune.format import QuantizationConfig
from vllm_outliertune.offline.model_io import UserError, read_auto_maps

# Files copied from the source model: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
INDEX_FILE = "model.safetensors.index.json"

log = logging.getLogger(__name__)


class WriteError(UserError, OSError):
    """Writing OUT_DIR failed (disk full, permissions); the message says what was kept. Still an OSError for
    callers that handle I/O errors."""


def check_output_dir(out_dir: Path, model_dir: Path, overwrite: bool, make_parents: bool = False) -> None:
    """Refuse, before any work, an OUT_DIR that would destroy the source or existing data. With ``make_parents``
    missing parent directories are created (mkdir -p), otherwise they must exist."""
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"OUT_DIR {out_dir} is the model directory; choose a different output directory")
    if model_dir.resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"OUT_DIR {out_dir} contains the model directory {model_dir}; choose another output directory")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"OUT_DIR {out_dir} exists and is not a directory; choose another path")
        if any(out_dir.iterdir()) and not overwrite:
            raise UserError(f"OUT_DIR {out_dir} already exists and is not empty; pass --overwrite to replace it, or "
                            f"choose another directory")
    if make_parents:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the parent directory of {out_dir} ({exc}); choose another path") from None
    if not out_dir.parent.exists():
        raise UserError(f"the parent directory of OUT_DIR {out_dir} does not exist; create it first")


def check_directory_option(path: Path, option: str) -> None:
    """A directory the command creates or reuses after its long work (--report, --calib-cache): refused up front,
    rather than after calibration, when it is a file or sits under one."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is" if existing == path else f"is under {existing}, which is"
                raise UserError(f"{option} {path} {where} a file, not a directory; choose another path")
            if not os.access(existing, os.W_OK):
                raise UserError(f"{option} {path}: cannot write to {existing}; choose another path")
            return


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    return shards


def write_weights(directory: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """safetensors file(s) in ``directory``; sharded with an index when larger than ``max_shard_bytes``."""
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(dict(shards[0]), str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(directory / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True))
    return names


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def temp_dir_prefix(out_dir: Path, pid: int | None = None) -> str:
    """Name prefix of the writer's temporary directory beside ``out_dir``: host and pid of the writing process, so
    that a later run can tell a dead writer's leftovers (kill -9, power loss) from a running writer's."""
    return f".{Path(out_dir).name}.tmp-{_host()}-{os.getpid() if pid is None else pid}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete the temporary directories beside ``out_dir`` whose writer died without cleaning up: only those made
    on this host (pids of other hosts or containers mean nothing here) by a process that no longer exists."""
    out_dir = Path(out_dir)
    pattern = re.compile(re.escape(f".{out_dir.name}.tmp-{_host()}-") + r"(?P<pid>\d{1,9})-[a-z0-9_]+")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir() or _process_alive(int(match["pid"])):
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted write of %s (%s); delete it by hand", path,
                        out_dir, exc)
            continue
        log.warning("removed %s, left by an interrupted write of %s (process %s no longer exists)", path, out_dir,
                    match["pid"])


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success it replaces ``out_dir`` (the old one is
    removed only after the new one is in place), on any exception it is deleted and ``out_dir`` is as before. A
    failed write (disk full, permissions) becomes a UserError naming ``out_dir``. Temporary directories of earlier
    writers that were killed (nothing could delete them then) are removed first."""
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    tmp = None
    try:
        remove_stale_temp_dirs(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(out_dir), dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
        yield tmp
        _swap_in(tmp, out_dir)
    except (OSError, SafetensorError) as exc:
        kept = "its previous content is unchanged" if existed else "nothing was written"
        raise WriteError(f"could not write {out_dir} ({exc}); {kept}. Free disk space or fix permissions, then "
                         f"run again") from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``. An existing ``out_dir`` is first moved aside, and moved back if the rename
    fails; it is deleted only once the new directory is in place."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, old / "previous")
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "previous", out_dir)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _class_references(auto_map: Mapping[str, object]) -> list[str]:
    """The "module.Class" strings of an auto_map: a value is one reference, or for tokenizers a [slow, fast] pair
    in which either may be null."""
    references = []
    for value in auto_map.values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    return [reference for reference in references if isinstance(reference, str)]


def custom_code_files(model_dir: Path) -> list[str]:
    """The module files of ``model_dir`` that its config.json / tokenizer_config.json auto_map entries name: the
    copies of those files in a checkpoint still name them, so they must come along. A reference to another
    repository ("org/repo--module.Class") is left out: transformers loads that code from there, not from here."""
    model_dir = Path(model_dir)
    files = set()
    for source, auto_map in read_auto_maps(model_dir).items():
        for reference in _class_references(auto_map):
            repo, _, local = reference.rpartition("--")
            module = local.rpartition(".")[0]
            if repo:
                log.warning("%s auto_map: %r names code of the repository %s, not of %s; not copied (transformers "
                            "fetches it from that repository)", model_dir / source, reference, repo, model_dir)
            elif not module.isidentifier() or not (model_dir / f"{module}.py").is_file():
                # transformers wants "module.Class" with module.py beside the config: nothing valid to copy.
                log.warning("%s auto_map: %r does not name a module file of %s; not copied", model_dir / source,
                            reference, model_dir)
            else:
                files.add(f"{module}.py")
    return sorted(files)


def write_checkpoint(out_dir: Path, model_dir: Path, hf_config: dict, quant_config: QuantizationConfig,
                     tensors: Mapping[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     extra_files: Mapping[str, str] | None = None) -> Path:
    """Write weights, config.json (+ quantization_config), the tokenizer files of ``model_dir``, the custom code
    files its auto_map entries name, and ``extra_files`` ({name: text}) into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    config = dict(hf_config, quantization_config=quant_config.to_dict())
    copied = TOKENIZER_FILES + tuple(custom_code_files(model_dir))
    with atomic_directory(out_dir) as tmp:
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in copied:
            if (Path(model_dir) / name).is_file():
                shutil.copyfile(Path(model_dir) / name, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
