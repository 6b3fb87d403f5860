"""Datasets for training and evaluating the CIFAR-layout models, with no torchvision.

- Fashion-MNIST from its IDX gzip files (Debian package ``dataset-fashion-mnist``,
  installed under /usr/share/datasets/fashion-mnist). The 28x28 grey images are padded
  to 32x32 (2 px of zeros on each side) and replicated to 3 channels, so the CIFAR
  architectures (SkipNet CIFAR models, BlockDrop FlatResNet32) apply unchanged. They are
  normalised with the mean/std of the padded training set (``FASHION_MNIST_MEAN/STD``,
  computed from the data; ``fashion_mnist_stats`` recomputes them).
- CIFAR-10/100 in the python-pickle layout (``data_batch_1..5``/``test_batch`` or
  ``train``/``test``), normalised as the official code does: SkipNet's CIFAR constants
  (ucbdrive/skipnet ``cifar/data.py``) by default, BlockDrop's R32_C10 constants or none (ToTensor
  only, BlockDrop R110/C100) on request.

Training augmentation (random crop 32 with 4 px zero padding + horizontal flip, as the
official scripts) is done with torch ops on whole batches; ``Batches`` is a seedable
in-memory batch iterator.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean/std of the 60000 training images after padding to 32x32, pixel values in [0, 1]
# (fashion_mnist_stats() recomputes them; tests check they agree).
FASHION_MNIST_MEAN = 0.2190
FASHION_MNIST_STD = 0.3318

# Official normalisations.
SKIPNET_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SKIPNET_CIFAR_STD = (0.2023, 0.1994, 0.2010)
BLOCKDROP_R32_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
BLOCKDROP_R32_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")
NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "synthetic": 10}

INSTALL_HINT = ("install the Debian package with `apt-get update && apt-get install -y "
                "dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist), or "
                "pass --data-dir / data_dir= pointing at a folder holding "
                "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


class DatasetNotFound(FileNotFoundError):
    """The data files are not where they were looked for; the message says how to get them."""


# --------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)
# --------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file into a numpy array (big-endian header, ubyte data)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type 0x{dtype_code:02x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset != count:
        raise ValueError(f"{path}: truncated IDX file (expected {count} values, "
                         f"found {len(data) - offset})")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _fashion_dir(data_dir: Optional[str]) -> str:
    d = os.fspath(data_dir) if data_dir is not None else os.environ.get(
        "DYNEXEC_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair
               if not os.path.isfile(os.path.join(d, f))]
    if missing:
        where = "does not exist" if not os.path.isdir(d) else f"lacks {', '.join(missing)}"
        raise DatasetNotFound(f"Fashion-MNIST not found: {d} {where}; {INSTALL_HINT}")
    return d


def fashion_mnist_available(data_dir: Optional[str] = None) -> bool:
    try:
        _fashion_dir(data_dir)
        return True
    except DatasetNotFound:
        return False


def load_fashion_mnist_raw(split: str = "train", data_dir: Optional[str] = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of split 'train' or 'test'."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _fashion_dir(data_dir)
    img_file, lbl_file = FASHION_MNIST_FILES[split]
    images = read_idx(os.path.join(d, img_file))
    labels = read_idx(os.path.join(d, lbl_file)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{d}: inconsistent Fashion-MNIST {split} files "
                         f"(images {images.shape}, labels {labels.shape})")
    return images, labels


def pad_to_32_rgb(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 3, 32, 32] in [0, 1], 2 px zero border per side."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def fashion_mnist_stats(data_dir: Optional[str] = None) -> tuple[float, float]:
    """Mean and std of the padded 32x32 training images in [0, 1] (float64 sums)."""
    images, _ = load_fashion_mnist_raw("train", data_dir)
    x = np.pad(images.astype(np.float64) / 255.0, ((0, 0), (2, 2), (2, 2)))
    return float(x.mean()), float(x.std())


def load_fashion_mnist(split: str = "train", data_dir: Optional[str] = None,
                       limit: Optional[int] = None, normalize: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (float32 [N, 3, 32, 32], int64 [N]) ready for the CIFAR models."""
    images, labels = load_fashion_mnist_raw(split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = pad_to_32_rgb(images)
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x, torch.from_numpy(labels.copy())


def fashion_mnist_test(limit: Optional[int] = None, data_dir: Optional[str] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised Fashion-MNIST test images the shipped checkpoints expect:
    (float32 [N, 3, 32, 32], int64 [N]), the first ``limit`` of the 10000 if given."""
    return load_fashion_mnist("test", data_dir, limit=limit)


# --------------------------------------------------------------------------------------
# CIFAR (python pickle layout)
# --------------------------------------------------------------------------------------
def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_files(name: str, split: str, data_dir: str) -> tuple[list[str], str]:
    if name == "cifar10":
        candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-py")]
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    elif name == "cifar100":
        candidates = [data_dir, os.path.join(data_dir, "cifar-100-python")]
        files = ["train"] if split == "train" else ["test"]
        key = "fine_labels"
    else:
        raise ValueError(f"unknown CIFAR dataset {name!r}")
    for d in candidates:
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            return [os.path.join(d, f) for f in files], key
    raise DatasetNotFound(
        f"{name} ({split}) not found in {data_dir}: expected the python-pickle files "
        f"{', '.join(files)} there or in {os.path.basename(candidates[1])}/ below it "
        f"(the 'python version' archive from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"downloaded and unpacked by you; dynexec never downloads data)")


def load_cifar(name: str, split: str, data_dir: str, limit: Optional[int] = None,
               normalization: str = "skipnet") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 as (float32 [N, 3, 32, 32], int64 [N]).

    normalization: 'skipnet' (SkipNet's cifar/data.py constants), 'blockdrop-r32'
    (BlockDrop R32_C10's constants) or 'none' (ToTensor only: BlockDrop R110/C100)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_dir is None:
        raise DatasetNotFound(f"{name}: give --data-dir / data_dir= with the python-pickle "
                              f"CIFAR files (dynexec never downloads data)")
    files, key = _cifar_files(name, split, os.fspath(data_dir))
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    t = torch.from_numpy(x).float().div_(255.0)
    if normalization == "skipnet":
        mean, std = SKIPNET_CIFAR_MEAN, SKIPNET_CIFAR_STD
    elif normalization == "blockdrop-r32":
        mean, std = BLOCKDROP_R32_MEAN, BLOCKDROP_R32_STD
    elif normalization == "none":
        mean, std = None, None
    else:
        raise ValueError(f"normalization must be 'skipnet', 'blockdrop-r32' or 'none', "
                         f"got {normalization!r}")
    if mean is not None:
        t.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1))
    return t, torch.from_numpy(y)


def synthetic_dataset(split: str = "train", n: Optional[int] = None, num_classes: int = 10,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated, learnable stand-in (for tests when no dataset is installed): each class
    is a fixed random 3x32x32 pattern plus noise, roughly zero mean / unit variance."""
    n = n if n is not None else (2000 if split == "train" else 500)
    protos = torch.randn((num_classes, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.6 * protos[y] + 0.8 * torch.randn((n, 3, 32, 32), generator=g)
    return x, y


def load_dataset(name: str, split: str, data_dir: Optional[str] = None,
                 limit: Optional[int] = None, normalization: str = "skipnet"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Any supported dataset by name ('fashion-mnist', 'cifar10', 'cifar100')."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir, limit=limit)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, split, data_dir, limit=limit, normalization=normalization)
    if name == "synthetic":
        return synthetic_dataset(split, limit)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def train_val_split(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint index tensors (train, val) of a seeded permutation of range(n)."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --------------------------------------------------------------------------------------
# Augmentation and batching
# --------------------------------------------------------------------------------------
def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None, padding: int = 4,
            flip: bool = True, pad_value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip on a batch [N, C, H, W].

    Padding uses ``pad_value`` (a scalar or a per-channel tensor; pass the normalised value
    of a black pixel to mimic torchvision's pad-then-normalise order)."""
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    gen_dev = "cpu"
    if padding > 0:
        padded = x.new_empty((n, c, h + 2 * padding, w + 2 * padding))
        if isinstance(pad_value, torch.Tensor):
            padded[:] = pad_value.to(x).view(1, c, 1, 1)
        else:
            padded.fill_(float(pad_value))
        padded[:, :, padding:padding + h, padding:padding + w] = x
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_dev)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_dev)
        rows = (oy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)  # [N, H]
        cols = (ox.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)  # [N, W]
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
        out = padded[idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    else:
        out = x.clone()
    if flip:
        mask = torch.rand((n,), generator=generator, device=gen_dev) < 0.5
        mask = mask.to(x.device)
        if bool(mask.any()):
            out[mask] = out[mask].flip(-1)
    return out


def black_value(mean, std) -> torch.Tensor:
    """The normalised value of a zero pixel (torchvision pads before normalising)."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    return -mean / std


@dataclass
class Batches:
    """Seedable in-memory batch iterator over tensors (x [N, ...], y [N]).

    Deterministic per (seed, epoch, batch index): ``batches(epoch, start)`` yields the
    batches of an epoch from batch ``start`` on, so an interrupted run resumes with
    exactly the batches it would have seen. ``iter()`` walks epochs 0, 1, 2, ... ."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int = 128
    shuffle: bool = True
    train_augment: bool = False
    drop_last: bool = False
    seed: int = 0
    pad_value: float | torch.Tensor = 0.0

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x and y differ in length: {self.x.shape[0]} vs {self.y.shape[0]}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.epoch = 0

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        n = self.x.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.train_augment:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + i)
                xb = augment(xb, g, pad_value=self.pad_value)
            yield xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self.batches(epoch)
