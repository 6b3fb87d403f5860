"""Shared test helpers: small models of every family with random weights, randomised
BatchNorm statistics and router biases set so that routing is mixed."""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
from pathlib import Path

import torch  # noqa: E402  (importing torch does not import any Triton kernel)

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which Triton reads
# when a kernel is decorated, so set it before anything imports them. Every test module
# then sees the same mode and the engine tests include the 'triton' backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import dynexec
from dynexec.tools.calibrate import calibrate, randomize_batchnorm


def _use_this_checkouts_kernels() -> None:
    """dynexec.kernels is installed from the top-level kernels/ folder (setup.py's
    package_dir), so with PYTHONPATH=<checkout> Python finds dynexec here but
    dynexec.kernels wherever dynexec is installed (e.g. an editable install of another
    checkout). Tests of this checkout must use its own Triton kernels."""
    root = Path(__file__).resolve().parents[1]
    kernels = root / "kernels"
    if Path(dynexec.__file__).resolve().parent != root / "dynexec" or "dynexec.kernels" in sys.modules:
        return
    if not (kernels / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "dynexec.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dynexec.kernels"] = module
    spec.loader.exec_module(module)
    dynexec.kernels = module


_use_this_checkouts_kernels()

# One intra-op thread by default: with OpenMP, two threads on a 2-core machine that is
# busy with anything else slow tiny convolutions down by an order of magnitude. The
# native-op tests that exercise at::parallel_for set their own thread counts.
torch.set_num_threads(int(os.environ.get("DYNEXEC_TEST_THREADS", "1")))

# name -> (constructor name, kwargs): small configurations of every model family.
FAMILIES = {
    "skipnet-cifar-rnn": ("cifar10_rnn_gate_38", {"layers": [3, 2, 3]}),
    "skipnet-cifar-rnn-rl": ("cifar100_rnn_gate_rl_38", {"layers": [2, 3, 2]}),
    "skipnet-cifar-ffgate1": ("cifar10_feedforward_38", {"layers": [2, 3, 2]}),
    "skipnet-cifar-ffgate2": ("cifar10_feedforward_110", {"layers": [3, 2, 2]}),
    "skipnet-imagenet-basic": ("imagenet_rnn_gate_18", {"layers": [1, 2, 1, 1]}),
    "skipnet-imagenet-bottleneck": ("imagenet_rnn_gate_50", {"layers": [1, 2, 1, 2]}),
    "resnet-cifar": ("cifar10_resnet_38", {"layers": [2, 2, 2]}),
    "resnet-imagenet": ("resnet50", {"layers": [1, 1, 1, 1]}),
    "blockdrop-cifar": ("R32_C10", {"layers": [3, 2, 3]}),
    "blockdrop-imagenet": ("R101_ImgNet", {"layers": [1, 2, 2, 1]}),
}
IMAGENET = {k for k, (name, _) in FAMILIES.items() if "imagenet" in name or name.startswith(("resnet", "R101"))}


def input_size(family: str) -> int:
    return 224 if family in IMAGENET else 32


def make_model(family: str, seed: int = 0, fraction: float | None = 0.5, calib_batch: int = 16,
               dtype: torch.dtype = torch.float32) -> dynexec.models.RoutedModel:
    """A random-weight eval model; routers calibrated to execute ``fraction`` of blocks.
    Built once per argument set; every call returns a fresh copy."""
    return copy.deepcopy(_make_model(family, seed, fraction, calib_batch, dtype))


@functools.lru_cache(maxsize=None)
def _make_model(family, seed, fraction, calib_batch, dtype):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = dynexec.build(name, **kwargs).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    model = model.to(dtype)
    if fraction is not None and model.router != "none":
        size = input_size(family)
        x = torch.randn(calib_batch if size == 32 else 2, 3, size, size, dtype=dtype,
                        generator=torch.Generator().manual_seed(seed + 2))
        calibrate(model, x, fraction)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() / scale


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param
