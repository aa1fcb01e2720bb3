"""Tests for spectral_mup.data: Tiny Shakespeare resolution, loaders and batch sampling."""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from spectral_mup import data as D
from spectral_mup.errors import DataError, SmupError

TS_LEN = 1115394
TS_TRAIN = 1003854  # int(0.9 * 1115394), as in nanoGPT shakespeare_char
TS_VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _shared_data_dir() -> Path:
    env = os.environ.get("SMUP_DATA_DIR", "")
    if env.strip():
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def ts_file() -> Path:
    path = _shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.fail(f"Tiny Shakespeare not at {path}: set SMUP_DATA_DIR (the Makefile does)")
    return path


@pytest.fixture(scope="session")
def ts_bytes(ts_file: Path) -> bytes:
    return ts_file.read_bytes()


@pytest.fixture
def shared_env(monkeypatch: pytest.MonkeyPatch, ts_file: Path, tmp_path: Path) -> Path:
    """SMUP_DATA_DIR points at the shared data; the cache is an empty tmp dir."""
    monkeypatch.setenv("SMUP_DATA_DIR", str(ts_file.parents[1]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return ts_file


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No data anywhere: SMUP_DATA_DIR unset, cache in an empty tmp dir, no network."""
    monkeypatch.delenv("SMUP_DATA_DIR", raising=False)
    cache_home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return cache_home / "spectral-mup"


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert isinstance(err.value, SmupError)
    assert "\n" not in msg and "\r" not in msg
    assert msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------------------
# Tiny Shakespeare
# --------------------------------------------------------------------------------------


def test_tiny_shakespeare_loads(shared_env: Path) -> None:
    ds = D.load_dataset("shakespeare")
    assert ds.vocab_size == 65
    assert ds.itos == list(TS_VOCAB)
    assert len(ds.train) + len(ds.val) == TS_LEN
    assert len(ds.train) == TS_TRAIN
    assert len(ds.val) == TS_LEN - TS_TRAIN == 111540
    assert ds.train.ndim == ds.val.ndim == 1
    assert ds.train.dtype == np.uint16
    text = shared_env.read_text(encoding="utf-8")
    assert ds.decode(ds.train) == text[:TS_TRAIN]
    assert ds.decode(ds.val) == text[TS_TRAIN:]
    assert ds.decode(ds.train[:14]) == "First Citizen:"
    assert ds.train[:5].tolist() == [18, 47, 56, 57, 58]
    assert "Tiny Shakespeare" in ds.source
    # None, "" and the other name resolve the same way.
    for spec in (None, "", "tinyshakespeare"):
        other = D.load_dataset(spec)
        assert np.array_equal(other.train, ds.train)
        assert np.array_equal(other.val, ds.val)


def test_encode_decode_round_trip(shared_env: Path) -> None:
    ds = D.load_dataset()
    assert ds.encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]
    s = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    ids = ds.encode(s)
    assert len(ids) == len(s)
    assert ds.decode(ids) == s
    assert ds.decode(torch.tensor(ids)) == s
    assert ds.decode(np.array(ids)) == s
    with pytest.raises(DataError) as err:
        ds.encode("café")
    assert "'é'" in _assert_one_line(err)
    with pytest.raises(DataError) as err:
        ds.decode([0, 65])
    assert "65" in _assert_one_line(err)


def test_get_batch_deterministic_and_shifted(shared_env: Path) -> None:
    ds = D.load_dataset()
    x1, y1 = ds.get_batch("train", 4, 8, torch.Generator().manual_seed(1337))
    x2, y2 = ds.get_batch("train", 4, 8, torch.Generator().manual_seed(1337))
    assert x1.shape == y1.shape == (4, 8)
    assert x1.dtype == y1.dtype == torch.int64
    assert x1.device.type == "cpu"
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # Same offsets as nanoGPT's get_batch.
    ix = torch.randint(TS_TRAIN - 8, (4,), generator=torch.Generator().manual_seed(1337))
    for row, i in enumerate(ix.tolist()):
        assert x1[row].tolist() == ds.train[i : i + 8].tolist()
        assert y1[row].tolist() == ds.train[i + 1 : i + 9].tolist()
    x3, _ = ds.get_batch("train", 4, 8, torch.Generator().manual_seed(1338))
    assert not torch.equal(x1, x3)
    xv, yv = ds.get_batch("val", 2, 16, torch.Generator().manual_seed(0))
    assert xv.shape == (2, 16) and torch.equal(xv[:, 1:], yv[:, :-1])


def test_get_batch_exact_values_and_errors() -> None:
    ds = D.Dataset(train=np.arange(100, dtype=np.uint16), val=np.arange(5), vocab_size=100)
    g = torch.Generator().manual_seed(0)
    x, y = ds.get_batch("train", 3, 5, g)
    ix = torch.randint(95, (3,), generator=torch.Generator().manual_seed(0)).tolist()
    assert x.tolist() == [list(range(i, i + 5)) for i in ix]
    assert y.tolist() == [list(range(i + 1, i + 6)) for i in ix]
    # The generator advanced: the next batch is different.
    x_next, _ = ds.get_batch("train", 3, 5, g)
    assert not torch.equal(x, x_next)
    # Boundary: len(data) == block_size + 1 leaves exactly one offset, 0.
    xv, yv = ds.get_batch("val", 2, 4, torch.Generator().manual_seed(0))
    assert xv.tolist() == [[0, 1, 2, 3]] * 2
    assert yv.tolist() == [[1, 2, 3, 4]] * 2
    with pytest.raises(DataError) as err:
        ds.get_batch("val", 2, 5, torch.Generator())
    msg = _assert_one_line(err)
    assert "val" in msg and "block_size 5" in msg and "5 tokens" in msg
    with pytest.raises(ValueError):
        ds.get_batch("test", 2, 4, torch.Generator())
    with pytest.raises(DataError) as err:
        ds.encode("a")
    _assert_one_line(err)


# --------------------------------------------------------------------------------------
# Resolution order, checksum, download
# --------------------------------------------------------------------------------------


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.cache_dir() == tmp_path / "spectral-mup"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.cache_dir() == tmp_path / "home" / ".cache" / "spectral-mup"


def test_resolution_order(isolated: Path, ts_file: Path, tmp_path: Path, monkeypatch) -> None:
    explicit_dir = tmp_path / "explicit"
    env_dir = tmp_path / "env"
    for root in (explicit_dir, env_dir, isolated):
        (root / "tinyshakespeare").mkdir(parents=True)
        shutil.copyfile(ts_file, root / "tinyshakespeare" / "input.txt")
    monkeypatch.setenv("SMUP_DATA_DIR", str(env_dir))
    cached = isolated / "tinyshakespeare" / "input.txt"

    # Explicit path beats env beats cache.
    assert D.resolve_tiny_shakespeare(explicit_dir) == explicit_dir / "tinyshakespeare/input.txt"
    explicit_file = explicit_dir / "tinyshakespeare" / "input.txt"
    assert D.resolve_tiny_shakespeare(explicit_file) == explicit_file
    assert D.resolve_tiny_shakespeare() == env_dir / "tinyshakespeare" / "input.txt"
    monkeypatch.setenv("SMUP_DATA_DIR", str(tmp_path / "empty"))
    assert D.resolve_tiny_shakespeare() == cached
    monkeypatch.delenv("SMUP_DATA_DIR")
    assert D.resolve_tiny_shakespeare() == cached

    # A directory holding input.txt directly is accepted too.
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copyfile(ts_file, flat / "input.txt")
    assert D.resolve_tiny_shakespeare(flat) == flat / "input.txt"

    # load_dataset on a directory with tinyshakespeare/input.txt uses it.
    ds = D.load_dataset(explicit_dir)
    assert ds.vocab_size == 65 and len(ds.train) == TS_TRAIN

    # An explicit path that does not exist is an error, even though the cache has a copy.
    with pytest.raises(DataError) as err:
        D.resolve_tiny_shakespeare(tmp_path / "nope")
    assert "does not exist" in _assert_one_line(err)
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    with pytest.raises(DataError) as err:
        D.resolve_tiny_shakespeare(empty_dir)
    assert "contains neither" in _assert_one_line(err)


def test_corrupted_copy_fails_sha(isolated: Path, ts_bytes: bytes, tmp_path: Path, monkeypatch):
    env_dir = tmp_path / "env"
    (env_dir / "tinyshakespeare").mkdir(parents=True)
    bad = bytearray(ts_bytes)
    bad[1000] = ord("#") if bad[1000] != ord("#") else ord("%")
    bad_path = env_dir / "tinyshakespeare" / "input.txt"
    bad_path.write_bytes(bytes(bad))
    monkeypatch.setenv("SMUP_DATA_DIR", str(env_dir))
    for call in (D.resolve_tiny_shakespeare, D.load_dataset):
        with pytest.raises(DataError) as err:
            call()
        msg = _assert_one_line(err)
        assert "SHA-256" in msg and str(bad_path) in msg
        assert D.TINY_SHAKESPEARE_URL in msg
    # The same bytes passed as an arbitrary text file load fine (no checksum there).
    ds = D.load_dataset(bad_path)
    assert len(ds.train) + len(ds.val) == TS_LEN
    # Repairing the file in place (new size/mtime) is noticed despite the hash cache.
    bad_path.write_bytes(ts_bytes)
    os.utime(bad_path, ns=(1, 1))
    assert D.resolve_tiny_shakespeare() == bad_path


def test_offline_error_names_cache_path(isolated: Path) -> None:
    expected = isolated / "tinyshakespeare" / "input.txt"
    with pytest.raises(DataError) as err:
        D.resolve_tiny_shakespeare()
    msg = _assert_one_line(err)
    assert str(expected) in msg
    assert "SMUP_DATA_DIR" in msg
    assert "network disabled in tests" in msg
    assert _files_under(isolated) == []
    with pytest.raises(DataError) as err:
        D.load_dataset("shakespeare")
    assert str(expected) in _assert_one_line(err)
    # download=False never touches the network and names the same place.
    with pytest.raises(DataError) as err:
        D.resolve_tiny_shakespeare(download=False)
    msg = _assert_one_line(err)
    assert str(expected) in msg and "SMUP_DATA_DIR" in msg
    assert _files_under(isolated) == []


def test_download_lands_in_cache(isolated: Path, ts_bytes: bytes, monkeypatch) -> None:
    calls: list[tuple] = []

    def fake_urlopen(url, *args, **kwargs):
        calls.append((url, kwargs.get("timeout")))
        return io.BytesIO(ts_bytes)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = D.resolve_tiny_shakespeare()
    expected = isolated / "tinyshakespeare" / "input.txt"
    assert path == expected
    assert calls == [(D.TINY_SHAKESPEARE_URL, 30.0)]
    assert expected.read_bytes() == ts_bytes
    assert _files_under(isolated) == [expected]
    # Second call finds the cache and does not download again.
    assert D.resolve_tiny_shakespeare() == expected
    assert len(calls) == 1
    ds = D.load_dataset()
    assert ds.vocab_size == 65 and len(ds.train) + len(ds.val) == TS_LEN


def test_download_with_wrong_bytes(isolated: Path, ts_bytes: bytes, monkeypatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(ts_bytes[:-1]))
    with pytest.raises(DataError) as err:
        D.resolve_tiny_shakespeare()
    msg = _assert_one_line(err)
    assert "SHA-256" in msg
    assert str(isolated / "tinyshakespeare" / "input.txt") in msg
    assert _files_under(isolated) == []


def test_download_interrupted_leaves_nothing(isolated: Path, monkeypatch) -> None:
    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 0:
                raise TimeoutError("timed out")
            return super().read(10)

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Broken(b"x" * 100))
    with pytest.raises(DataError) as err:
        D.resolve_tiny_shakespeare()
    assert "timed out" in _assert_one_line(err)
    assert _files_under(isolated) == []


# --------------------------------------------------------------------------------------
# Text files
# --------------------------------------------------------------------------------------


def test_load_text_small_file(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("abcabcabcdabcabcabcd", encoding="utf-8")  # 20 chars: 18 train, 2 val
    ds = D.load_text(p)
    assert ds.itos == ["a", "b", "c", "d"] and ds.vocab_size == 4
    assert ds.train.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1]
    assert ds.val.tolist() == [2, 3]
    assert ds.encode("dcba") == [3, 2, 1, 0]


def test_load_text_splits_and_unicode(tmp_path: Path) -> None:
    p = tmp_path / "u.txt"
    p.write_text("héllo wörld ✓ " * 10, encoding="utf-8")  # 140 chars
    ds = D.load_text(p)
    assert len(ds.train) == 126 and len(ds.val) == 14
    assert ds.vocab_size == 10
    assert ds.itos == sorted(set("héllo wörld ✓ "))
    assert ds.decode(ds.train) + ds.decode(ds.val) == "héllo wörld ✓ " * 10
    ds2 = D.load_text(p, val_fraction=0.5)
    assert len(ds2.train) == 70 and len(ds2.val) == 70
    assert D.load_dataset(p).source == str(p)


def test_load_text_errors(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError) as err:
        D.load_text(latin1)
    msg = _assert_one_line(err)
    assert "UTF-8" in msg and "offset 3" in msg
    with pytest.raises(DataError) as err:
        D.load_dataset(latin1)
    _assert_one_line(err)

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        D.load_text(empty)
    assert "empty" in _assert_one_line(err)

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefghij", encoding="utf-8")  # 9 train chars, 1 val char
    with pytest.raises(DataError) as err:
        D.load_text(tiny)
    assert "10 characters" in _assert_one_line(err)

    with pytest.raises(DataError) as err:
        D.load_text(tmp_path / "missing.txt")
    assert "does not exist" in _assert_one_line(err)
    with pytest.raises(DataError) as err:
        D.load_text(tiny, val_fraction=1.0)
    _assert_one_line(err)

    missing = tmp_path / "no" / "such"
    with pytest.raises(DataError) as err:
        D.load_dataset(missing)
    assert _assert_one_line(err).startswith(f"data path {missing} does not exist;")
    with pytest.raises(DataError) as err:
        D.load_dataset(tmp_path)  # a directory with neither train.bin nor tinyshakespeare
    _assert_one_line(err)


# --------------------------------------------------------------------------------------
# .bin files
# --------------------------------------------------------------------------------------


def test_bin_round_trip(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 50, encoding="utf-8")
    ds = D.load_text(text)
    out = D.prepare_bin(ds, tmp_path / "bin")
    assert out == tmp_path / "bin"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert (out / "train.bin").stat().st_size == 2 * len(ds.train) == 2 * 1845
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta == {"vocab_size": 15, "itos": ds.itos}

    loaded = D.load_bin(out)
    assert isinstance(loaded.train, np.memmap) and loaded.train.dtype == np.uint16
    assert np.array_equal(loaded.train, ds.train) and np.array_equal(loaded.val, ds.val)
    assert loaded.vocab_size == ds.vocab_size == 15 and loaded.itos == ds.itos
    assert loaded.decode(loaded.val[:10]) == ds.decode(ds.val[:10])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xa, ya = loaded.get_batch("train", 4, 16, g1)
    xb, yb = ds.get_batch("train", 4, 16, g2)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)

    via_spec = D.load_dataset(out)
    assert np.array_equal(via_spec.train, ds.train) and via_spec.vocab_size == 15
    assert D.load_bin(out, vocab_size=100).vocab_size == 100
    # Rewriting in place works (os.replace over the memmapped files on POSIX).
    D.prepare_bin(ds, out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_load_bin_errors(tmp_path: Path) -> None:
    d = tmp_path / "tok"
    d.mkdir()
    np.array([1, 2, 3, 4, 5], dtype=np.uint16).tofile(d / "train.bin")
    np.array([6, 7, 8], dtype=np.uint16).tofile(d / "val.bin")

    with pytest.raises(DataError) as err:
        D.load_bin(d)
    msg = _assert_one_line(err)
    assert "vocab_size" in msg and "meta.json" in msg
    with pytest.raises(DataError) as err:
        D.load_dataset(d)
    assert "vocab_size" in _assert_one_line(err)

    ds = D.load_bin(d, vocab_size=9)
    assert ds.train.tolist() == [1, 2, 3, 4, 5] and ds.val.tolist() == [6, 7, 8]
    assert ds.itos is None
    with pytest.raises(DataError) as err:
        ds.decode([1])
    _assert_one_line(err)

    with pytest.raises(DataError) as err:
        D.load_bin(d, vocab_size=8)
    msg = _assert_one_line(err)
    assert "token id 8" in msg and "vocab_size 8" in msg

    (d / "meta.json").write_text(json.dumps({"vocab_size": 9}), encoding="utf-8")
    assert D.load_bin(d).vocab_size == 9
    (d / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError) as err:
        D.load_bin(d)
    _assert_one_line(err)
    (d / "meta.json").unlink()

    with open(d / "val.bin", "ab") as f:
        f.write(b"\x00")  # 7 bytes
    with pytest.raises(DataError) as err:
        D.load_bin(d, vocab_size=9)
    msg = _assert_one_line(err)
    assert "odd" in msg and "7 bytes" in msg and "val.bin" in msg

    (d / "val.bin").unlink()
    with pytest.raises(DataError) as err:
        D.load_bin(d, vocab_size=9)
    assert "val.bin" in _assert_one_line(err)
    with pytest.raises(DataError) as err:
        D.load_bin(tmp_path / "absent", vocab_size=9)
    _assert_one_line(err)


def test_prepare_bin_takes_every_uint16_token_id(tmp_path: Path) -> None:
    """uint16 holds ids 0-65535, so a vocabulary of 65536 fits and 65537 does not."""
    ds = D.Dataset(train=np.arange(10), val=np.arange(10), vocab_size=65537)
    with pytest.raises(DataError) as err:
        D.prepare_bin(ds, tmp_path / "out")
    msg = _assert_one_line(err)
    assert "vocab_size 65537" in msg and "at most 65536" in msg and "keep this dataset" in msg
    assert not (tmp_path / "out").exists()
    top = np.array([0, 1, 65535, 7, 65535, 3], dtype=np.int64)
    ds_ok = D.Dataset(train=top, val=top[::-1].copy(), vocab_size=65536)
    out = D.prepare_bin(ds_ok, tmp_path / "out")
    assert json.loads((out / "meta.json").read_text()) == {"vocab_size": 65536, "itos": None}
    loaded = D.load_bin(out)
    assert loaded.vocab_size == 65536 and loaded.train.tolist() == top.tolist()
    assert loaded.val.tolist() == top[::-1].tolist() and int(loaded.train.max()) == 65535


def _bin_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_prepare_bin_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = D.Dataset(train=np.arange(40) % 5, val=np.arange(20) % 5, vocab_size=5)
    new = D.Dataset(train=np.arange(60) % 7, val=np.arange(30) % 7, vocab_size=7)
    root = tmp_path / "data"
    out = root / "bin"
    real_write = D._write_uint16
    writes: list[int] = []

    def fail_on_val(arr, f):  # the train split is written, then the disk "fills up"
        writes.append(len(arr))
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real_write(arr, f)

    monkeypatch.setattr(D, "_write_uint16", fail_on_val)
    with pytest.raises(DataError) as err:
        D.prepare_bin(new, out)
    assert "No space left on device" in _assert_one_line(err)
    assert sorted(p.name for p in root.iterdir()) == []  # no output, no temporary directory
    monkeypatch.setattr(D, "_write_uint16", real_write)

    D.prepare_bin(old, out)
    before = _bin_files(out)
    writes.clear()
    monkeypatch.setattr(D, "_write_uint16", fail_on_val)
    with pytest.raises(DataError):
        D.prepare_bin(new, out)  # over an earlier output: the old files stay, all of them
    assert _bin_files(out) == before and sorted(p.name for p in root.iterdir()) == ["bin"]
    monkeypatch.setattr(D, "_write_uint16", real_write)

    real_rename = os.rename

    def fail_to_publish(src, dst):  # the old directory moved aside, then the new one fails
        if str(src).endswith(".part"):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(D.os, "rename", fail_to_publish)
    with pytest.raises(DataError):
        D.prepare_bin(new, out)
    monkeypatch.setattr(D.os, "rename", real_rename)
    assert _bin_files(out) == before and sorted(p.name for p in root.iterdir()) == ["bin"]

    assert D.prepare_bin(new, out) == out  # replaced as a whole
    assert D.load_bin(out).vocab_size == 7 and D.load_bin(out).train.tolist() == new.train.tolist()
    assert sorted(p.name for p in root.iterdir()) == ["bin"]

    (out / "notes.txt").write_text("mine")  # a file prepare_bin did not write: not replaced
    with pytest.raises(DataError) as err:
        D.prepare_bin(old, out)
    assert "'notes.txt'" in _assert_one_line(err) and "new or empty output directory" in str(err)
    assert (out / "notes.txt").read_text() == "mine" and D.load_bin(out).vocab_size == 7
