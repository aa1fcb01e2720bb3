"""Datasets and batch sampling for character-level and token language models.

Three kinds of data are supported:

* Tiny Shakespeare (the default), found locally or downloaded once into the cache and
  always checked against its SHA-256;
* any UTF-8 text file, encoded character by character (nanoGPT ``shakespeare_char``);
* nanoGPT-style ``train.bin`` / ``val.bin`` files of uint16 token ids, memory-mapped.

Batches are sampled exactly as in nanoGPT, so a seeded ``torch.Generator`` gives the same
batches on every run.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import json
import os
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .fileio import json_text

__all__ = [
    "TINY_SHAKESPEARE_SHA256",
    "TINY_SHAKESPEARE_URL",
    "Dataset",
    "cache_dir",
    "load_bin",
    "load_dataset",
    "load_text",
    "prepare_bin",
    "resolve_tiny_shakespeare",
]

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

_TS_SUBPATH = Path("tinyshakespeare") / "input.txt"
_SHAKESPEARE_NAMES = frozenset({"", "shakespeare", "tinyshakespeare", "tiny_shakespeare"})
_DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_UINT16_MAX = 65535  # the largest token id a .bin file holds: vocab_size <= 65536
_BIN_FILES = ("train.bin", "val.bin", "meta.json")  # what prepare_bin writes


def _one_line(obj: object) -> str:
    """Collapse any whitespace (newlines included) so that a message stays on one line."""
    return " ".join(str(obj).split())


# --------------------------------------------------------------------------------------
# Locating Tiny Shakespeare
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/spectral-mup``, or ``~/.cache/spectral-mup`` when unset."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg.strip() else Path.home() / ".cache"
    return base / "spectral-mup"


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; the size and mtime in the key make a changed file hash again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _check_tiny_shakespeare(path: Path) -> Path:
    """Return ``path`` if its SHA-256 is Tiny Shakespeare's, else raise :class:`DataError`."""
    try:
        digest = _file_sha256(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({_one_line(e)}); check its permissions") from e
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(
            f"{path} fails its SHA-256 check (got {digest}, expected "
            f"{TINY_SHAKESPEARE_SHA256}); replace it with the original file from "
            f"{TINY_SHAKESPEARE_URL}"
        )
    return path


def _download_tiny_shakespeare(dest: Path) -> Path:
    """Download Tiny Shakespeare to ``dest`` atomically; never leaves a partial file."""
    where = (
        f"download {TINY_SHAKESPEARE_URL} yourself and save it as {dest}, or set "
        f"SMUP_DATA_DIR to a directory that contains {_TS_SUBPATH.as_posix()}"
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".input.txt.", suffix=".part")
    except OSError as e:
        raise DataError(
            f"cannot create the cache directory {dest.parent} ({_one_line(e)}); {where}"
        ) from e
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=_DOWNLOAD_TIMEOUT_S) as resp,
        ):
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        if digest != TINY_SHAKESPEARE_SHA256:
            raise DataError(
                f"the file downloaded from {TINY_SHAKESPEARE_URL} fails its SHA-256 check "
                f"(got {digest}, expected {TINY_SHAKESPEARE_SHA256}); {where}"
            )
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, http.client.HTTPException) as e:
        tmp.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DataError(
            f"cannot download Tiny Shakespeare ({_one_line(reason) or type(e).__name__}); {where}"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _explicit_tiny_shakespeare(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / _TS_SUBPATH, p / "input.txt"):
            if candidate.is_file():
                return candidate
        raise DataError(
            f"directory {p} contains neither {_TS_SUBPATH.as_posix()} nor input.txt; "
            f"pass the Tiny Shakespeare input.txt file or a directory that contains it"
        )
    raise DataError(
        f"Tiny Shakespeare path {p} does not exist; pass the input.txt file or a directory "
        f"that contains {_TS_SUBPATH.as_posix()}"
    )


def resolve_tiny_shakespeare(path: str | Path | None = None, *, download: bool = True) -> Path:
    """Find Tiny Shakespeare's ``input.txt``, downloading it into the cache if needed.

    Looks at, in order: ``path`` (the file, or a directory holding
    ``tinyshakespeare/input.txt`` or ``input.txt``), ``$SMUP_DATA_DIR/tinyshakespeare/input.txt``
    and ``cache_dir()/tinyshakespeare/input.txt``; otherwise downloads it to the cache when
    ``download`` is true. The file found is checked against :data:`TINY_SHAKESPEARE_SHA256`.
    """
    if path is not None and str(path) != "":
        return _check_tiny_shakespeare(_explicit_tiny_shakespeare(path))

    looked: list[Path] = []
    env = os.environ.get("SMUP_DATA_DIR", "")
    if env.strip():
        candidate = Path(env).expanduser() / _TS_SUBPATH
        if candidate.is_file():
            return _check_tiny_shakespeare(candidate)
        looked.append(candidate)

    cached = cache_dir() / _TS_SUBPATH
    if cached.is_file():
        return _check_tiny_shakespeare(cached)
    looked.append(cached)

    if not download:
        raise DataError(
            f"Tiny Shakespeare not found (looked at {', '.join(map(str, looked))}); save "
            f"{TINY_SHAKESPEARE_URL} as {cached}, or set SMUP_DATA_DIR to a directory that "
            f"contains {_TS_SUBPATH.as_posix()}"
        )
    return _check_tiny_shakespeare(_download_tiny_shakespeare(cached))


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class Dataset:
    """Train and validation token streams plus the vocabulary that decodes them."""

    train: np.ndarray | np.memmap
    val: np.ndarray | np.memmap
    vocab_size: int
    itos: list[str] | None = None
    source: str = ""
    _stoi: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        return (
            f"Dataset(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"train={len(self.train)} tokens, val={len(self.val)} tokens)"
        )

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to character ids (character datasets only)."""
        if self.itos is None:
            raise DataError(
                f"dataset {self.source or '(unnamed)'} has no character vocabulary; "
                f"encode text with the tokenizer that produced its .bin files"
            )
        if self._stoi is None:
            self._stoi = {ch: i for i, ch in enumerate(self.itos)}
        stoi = self._stoi
        try:
            return [stoi[ch] for ch in text]
        except KeyError as e:
            raise DataError(
                f"character {e.args[0]!r} is not in the vocabulary of "
                f"{self.source or 'this dataset'}; remove it from the text"
            ) from None

    def decode(self, ids: Iterable[int] | Tensor | np.ndarray) -> str:
        """Decode ids (a list, array or tensor) back to text."""
        if self.itos is None:
            raise DataError(
                f"dataset {self.source or '(unnamed)'} has no character vocabulary; "
                f'add an "itos" list to its meta.json or decode with its tokenizer'
            )
        if isinstance(ids, (Tensor, np.ndarray)):
            values = [int(i) for i in ids.reshape(-1).tolist()]
        else:
            values = [int(i) for i in ids]
        itos = self.itos
        bad = next((i for i in values if not 0 <= i < len(itos)), None)
        if bad is not None:
            raise DataError(
                f"token id {bad} is outside the vocabulary of {len(itos)} entries of "
                f"{self.source or 'this dataset'}; decode only ids this dataset produced"
            )
        return "".join(itos[i] for i in values)

    def get_batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Sample ``(x, y)`` int64 CPU tensors of shape ``(batch_size, block_size)``.

        As in nanoGPT: ``ix = torch.randint(len(data) - block_size, (batch_size,))``,
        ``x = data[i:i+block_size]`` and ``y = data[i+1:i+1+block_size]``.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(
                f"batch_size and block_size must be positive, got {batch_size} and {block_size}"
            )
        data = self.train if split == "train" else self.val
        if len(data) <= block_size:
            raise DataError(
                f"the {split} split of {self.source or 'the dataset'} has {len(data)} tokens, "
                f"too short for block_size {block_size}; lower block_size below {len(data)} "
                f"or use more data"
            )
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        idx = ix.numpy()[:, None] + np.arange(block_size + 1, dtype=np.int64)
        chunk = np.asarray(data[idx], dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(chunk[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(chunk[:, 1:]))
        return x, y


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def load_text(path: str | Path, val_fraction: float = 0.1) -> Dataset:
    """Load a UTF-8 text file as a character-level dataset.

    The vocabulary is ``sorted(set(text))``; the first ``1 - val_fraction`` of the characters
    are the training split and the rest the validation split (nanoGPT ``shakespeare_char``).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"text file {p} does not exist; check the data path")
    if not p.is_file():
        raise DataError(f"{p} is not a file; pass a UTF-8 text file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {p} ({_one_line(e)}); check its permissions") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 "
            f"or pass a directory of nanoGPT train.bin/val.bin files"
        ) from None
    n = len(text)
    n_train = int(n * (1.0 - val_fraction))
    if n == 0:
        raise DataError(f"text file {p} is empty; pass a file with some text")
    if n_train < 2 or n - n_train < 2:
        raise DataError(
            f"text file {p} has only {n} characters, too few for a train and a validation "
            f"split with val_fraction {val_fraction}; use a larger file"
        )
    itos = sorted(set(text))
    # Encode without a Python loop: code points, then their rank in the sorted vocabulary.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.array([ord(c) for c in itos], dtype=np.uint32)
    dtype = np.uint16 if len(itos) <= _UINT16_MAX + 1 else np.int32
    ids = np.searchsorted(vocab_codes, codes).astype(dtype)
    return Dataset(
        train=ids[:n_train],
        val=ids[n_train:],
        vocab_size=len(itos),
        itos=itos,
        source=str(p),
    )


@functools.lru_cache(maxsize=64)
def _max_token_cached(path: str, size: int, mtime_ns: int) -> int:
    return int(np.memmap(path, dtype=np.uint16, mode="r").max())


def _open_bin(path: Path) -> np.memmap:
    if not path.is_file():
        raise DataError(
            f"{path} is missing; a token dataset directory needs train.bin and val.bin "
            f"(uint16 token ids, as written by prepare_bin or nanoGPT's prepare.py)"
        )
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty; regenerate the .bin files")
    if size % 2:
        raise DataError(
            f"{path} is corrupt: its size {size} bytes is odd, not a whole number of uint16 "
            f"tokens; regenerate the .bin files"
        )
    try:
        return np.memmap(path, dtype=np.uint16, mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot map {path} ({_one_line(e)}); check the file") from e


def _read_meta(directory: Path) -> dict:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"cannot read {meta_path} ({_one_line(e)}); fix it or pass vocab_size"
        ) from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} must hold a JSON object; fix it or pass vocab_size")
    return meta


def load_bin(directory: str | Path, vocab_size: int | None = None) -> Dataset:
    """Load nanoGPT-style ``train.bin`` / ``val.bin`` (uint16) as read-only memmaps.

    ``vocab_size`` comes from the argument, else from ``directory/meta.json``
    (``{"vocab_size": N, "itos": [...]}``, ``itos`` optional).
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DataError(f"token data directory {d} does not exist; check the data path")
    train = _open_bin(d / "train.bin")
    val = _open_bin(d / "val.bin")

    meta = _read_meta(d)
    meta_path = d / "meta.json"
    if vocab_size is None:
        vocab_size = meta.get("vocab_size")
        if vocab_size is None:
            raise DataError(
                f"vocab_size of {d} is unknown; pass vocab_size or write "
                f'{{"vocab_size": N}} to {meta_path}'
            )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"vocab_size must be a positive integer, got {vocab_size!r}")

    itos = meta.get("itos")
    if itos is not None:
        if not isinstance(itos, list) or not all(isinstance(s, str) for s in itos):
            raise DataError(f'"itos" in {meta_path} must be a list of strings; fix it')
        if len(itos) > vocab_size:
            raise DataError(
                f'"itos" in {meta_path} has {len(itos)} entries but vocab_size is '
                f"{vocab_size}; make them agree"
            )

    for path in (d / "train.bin", d / "val.bin"):
        st = path.stat()
        top = _max_token_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)
        if top >= vocab_size:
            raise DataError(
                f"{path} holds token id {top}, not below vocab_size {vocab_size}; pass a "
                f"vocab_size above {top} or regenerate the .bin files"
            )
    return Dataset(train=train, val=val, vocab_size=vocab_size, itos=itos, source=str(d))


def load_dataset(spec: str | Path | None = None, *, vocab_size: int | None = None) -> Dataset:
    """Load a dataset from a name or a path.

    * ``None``, ``""``, ``"shakespeare"`` or ``"tinyshakespeare"``: Tiny Shakespeare
      (see :func:`resolve_tiny_shakespeare`), character level, SHA-256 checked;
    * a directory with ``train.bin``: :func:`load_bin` (``vocab_size`` is passed on);
    * a directory with ``tinyshakespeare/input.txt``: that file, SHA-256 checked;
    * any other existing file: :func:`load_text` (no checksum).

    For character data ``vocab_size`` is only checked to be large enough.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in _SHAKESPEARE_NAMES):
        path = resolve_tiny_shakespeare()
        ds = load_text(path)
        ds.source = f"Tiny Shakespeare ({path})"
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            if (p / "train.bin").exists():
                return load_bin(p, vocab_size)
            if (p / _TS_SUBPATH).is_file():
                path = resolve_tiny_shakespeare(p, download=False)
                ds = load_text(path)
                ds.source = f"Tiny Shakespeare ({path})"
            else:
                raise DataError(
                    f"directory {p} holds neither train.bin nor {_TS_SUBPATH.as_posix()}; pass "
                    f"a text file, a directory of train.bin/val.bin, or 'shakespeare'"
                )
        elif p.is_file():
            if p.name in ("train.bin", "val.bin"):
                return load_bin(p.parent, vocab_size)
            ds = load_text(p)
        else:
            raise DataError(
                f"data path {p} does not exist; pass a text file, a directory of "
                f"train.bin/val.bin, or 'shakespeare'"
            )
    if vocab_size is not None and vocab_size < ds.vocab_size:
        raise DataError(
            f"vocab_size {vocab_size} is smaller than the {ds.vocab_size} characters of "
            f"{ds.source}; raise vocab_size to at least {ds.vocab_size}"
        )
    return ds


# --------------------------------------------------------------------------------------
# Writing .bin files
# --------------------------------------------------------------------------------------


def _write_uint16(arr: np.ndarray | np.memmap, f) -> None:
    for start in range(0, len(arr), _CHUNK):
        np.asarray(arr[start : start + _CHUNK]).astype(np.uint16, copy=False).tofile(f)


def prepare_bin(dataset: Dataset, out_dir: str | Path) -> Path:
    """Write ``train.bin``, ``val.bin`` (uint16) and ``meta.json`` to ``out_dir``, all or nothing.

    The three files are written (and fsynced) into a temporary sibling directory, which then
    takes the place of ``out_dir`` by rename (:func:`_publish`): a reader sees the old
    directory or the new one, never a mix, and an error leaves ``out_dir`` as it was and no
    temporary directory behind. ``out_dir`` is replaced as a whole, so it must be new, empty
    or an earlier ``prepare_bin`` output. Returns ``out_dir``.
    """
    if dataset.vocab_size > _UINT16_MAX + 1:
        raise DataError(
            f"vocab_size {dataset.vocab_size} does not fit uint16 .bin files (token ids at most "
            f"{_UINT16_MAX}, so vocab_size at most {_UINT16_MAX + 1}); keep this dataset in "
            f"memory instead of calling prepare_bin"
        )
    out = Path(out_dir).expanduser()
    for name, arr in (("train", dataset.train), ("val", dataset.val)):
        if len(arr) and (int(np.min(arr)) < 0 or int(np.max(arr)) >= dataset.vocab_size):
            raise DataError(
                f"the {name} split of {dataset.source or 'the dataset'} holds token ids "
                f"outside [0, {dataset.vocab_size}); fix the dataset's vocab_size"
            )
    target = out.resolve()  # a symlink: replace the directory it names
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise DataError(f"{out} is the working directory (or holds it); pass a subdirectory")
    if target.exists() and not target.is_dir():
        raise DataError(f"{out} is a file; pass a directory for the token data")
    if target.is_dir():
        other = sorted(p.name for p in target.iterdir() if p.name not in _BIN_FILES)
        if other:
            raise DataError(
                f"{out} holds {other[0]!r}, which prepare_bin did not write, and the directory "
                f"is replaced as a whole; pass a new or empty output directory"
            )
    meta = {"vocab_size": int(dataset.vocab_size), "itos": dataset.itos}
    stage: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
        stage.mkdir()
        if target.is_dir():
            shutil.copymode(target, stage)
        for name, arr in (("train.bin", dataset.train), ("val.bin", dataset.val)):
            _write_synced(stage / name, lambda f, arr=arr: _write_uint16(arr, f))
        text = (json_text(meta) + "\n").encode("utf-8")
        _write_synced(stage / "meta.json", lambda f: f.write(text))
        _publish(stage, target)
    except OSError as e:
        raise DataError(
            f"cannot write token data to {out} ({_one_line(e)}); choose a writable directory"
        ) from e
    finally:
        if stage is not None:  # gone once published; on an error, the partial files
            shutil.rmtree(stage, ignore_errors=True)
    return out


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` (it must not exist), fill it through ``write(fileobj)`` and fsync."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _publish(stage: Path, out: Path) -> None:
    """Put the complete directory ``stage`` in place of ``out``: one rename when ``out`` is
    absent or empty; otherwise ``out`` is renamed aside first (a reader sees the old
    directory, briefly none, then the new one), put back if the second rename fails, and
    deleted once the new directory is in place."""
    try:
        os.replace(stage, out)  # rename(2): onto an absent or an empty directory
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not out.is_dir():
            raise
    old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
    os.rename(out, old)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
