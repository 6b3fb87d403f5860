"""dynexec.tools.data: Fashion-MNIST reading, padding, normalisation, augmentation, batching."""
from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from dynexec.tools import data

HAVE_FMNIST = data.fashion_mnist_available()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed "
                                  "(apt-get install -y dataset-fashion-mnist)")


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 8)):
        img, lbl = data.FASHION_MNIST_FILES[split]
        _write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / lbl, rng.integers(0, 10, (n,)))
    return tmp_path


def test_idx_roundtrip_and_padding(fake_fmnist):
    raw, labels = data.load_fashion_mnist_raw("train", fake_fmnist)
    assert raw.shape == (20, 28, 28) and labels.shape == (20,) and labels.dtype == np.int64
    x, y = data.load_fashion_mnist("train", fake_fmnist, normalize=False)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    # 2 px of zeros on each side, the image in the middle, identical channels
    assert torch.all(x[:, :, :2] == 0) and torch.all(x[:, :, -2:] == 0)
    assert torch.all(x[:, :, :, :2] == 0) and torch.all(x[:, :, :, -2:] == 0)
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(raw.astype(np.float32) / 255))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    xn, _ = data.load_fashion_mnist("test", fake_fmnist, limit=5)
    assert xn.shape == (5, 3, 32, 32)
    assert torch.allclose(xn[:, :, 0, 0], torch.tensor(-data.FASHION_MNIST_MEAN / data.FASHION_MNIST_STD))


def test_bad_idx_file(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(str(p))
    _write_idx(p, np.zeros((3, 2), np.uint8))
    with gzip.open(p, "rb") as f:
        blob = f.read()
    with gzip.open(p, "wb") as f:
        f.write(blob[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(p))


def test_missing_dir_error_says_how_to_install(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("train", tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        data.load_fashion_mnist_raw("test", tmp_path / "partial")
    assert not data.fashion_mnist_available(tmp_path / "nowhere")


@needs_fmnist
def test_real_fashion_mnist_shapes_and_stats():
    x, y = data.load_fashion_mnist("train")
    assert x.shape == (60000, 3, 32, 32) and y.shape == (60000,)
    assert sorted(torch.bincount(y).tolist()) == [6000] * 10
    mean, std = data.fashion_mnist_stats()
    assert abs(mean - data.FASHION_MNIST_MEAN) < 5e-5 and abs(std - data.FASHION_MNIST_STD) < 5e-5
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    xt, yt = data.fashion_mnist_test(limit=100)
    assert xt.shape == (100, 3, 32, 32) and yt.shape == (100,)
    assert data.fashion_mnist_test()[0].shape[0] == 10000


def test_cifar_pickle_layout(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 4))}, f)
    x, y = data.load_cifar("cifar10", "train", tmp_path)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    xr, _ = data.load_cifar("cifar10", "test", tmp_path, normalization="none")
    assert 0 <= float(xr.min()) and float(xr.max()) <= 1
    xs, _ = data.load_cifar("cifar10", "test", tmp_path, normalization="skipnet")
    expect = (xr - torch.tensor(data.SKIPNET_CIFAR_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(data.SKIPNET_CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(xs, expect, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="python-pickle"):
        data.load_cifar("cifar100", "test", tmp_path)


def test_augment_shapes_determinism_and_content():
    x = torch.randn(16, 3, 32, 32)
    a1 = data.augment(x, torch.Generator().manual_seed(3))
    a2 = data.augment(x, torch.Generator().manual_seed(3))
    a3 = data.augment(x, torch.Generator().manual_seed(4))
    assert a1.shape == x.shape and torch.equal(a1, a2) and not torch.equal(a1, a3)
    # no padding, no flip: identity; flip only: every image is itself or its mirror
    assert torch.equal(data.augment(x, padding=0, flip=False), x)
    f = data.augment(x, torch.Generator().manual_seed(0), padding=0)
    for i in range(16):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1))
    # crops are 32x32 windows of the zero-padded 40x40 image
    c = data.augment(x, torch.Generator().manual_seed(1), flip=False, pad_value=0.0)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        assert any(torch.equal(c[i], padded[i, :, dy:dy + 32, dx:dx + 32])
                   for dy in range(9) for dx in range(9))


def test_batches_seeded_and_resumable():
    x, y = torch.arange(50.0).view(50, 1, 1, 1).expand(50, 3, 32, 32).contiguous(), torch.arange(50)
    b1 = data.Batches(x, y, batch_size=8, seed=5, train_augment=True)
    b2 = data.Batches(x, y, batch_size=8, seed=5, train_augment=True)
    e1 = [yb for _, yb in b1.batches(0)]
    assert len(e1) == len(b1) == 7 and sorted(torch.cat(e1).tolist()) == list(range(50))
    assert all(torch.equal(a, b) for a, b in zip(e1, [yb for _, yb in b2.batches(0)]))
    # starting mid-epoch gives the remaining batches, augmentation included
    full = list(b1.batches(1))
    tail = list(b2.batches(1, start=3))
    assert all(torch.equal(fa[0], ta[0]) and torch.equal(fa[1], ta[1]) for fa, ta in zip(full[3:], tail))
    assert not torch.equal(torch.cat(e1), torch.cat([yb for _, yb in full]))
    d = data.Batches(x, y, batch_size=8, drop_last=True, shuffle=False)
    assert len(d) == 6 and torch.equal(next(iter(d))[1], torch.arange(8))


def test_train_val_split_disjoint():
    tr, va = data.train_val_split(100, 10, seed=0)
    assert len(tr) == 90 and len(va) == 10 and not set(tr.tolist()) & set(va.tolist())
