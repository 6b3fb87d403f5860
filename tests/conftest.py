"""Shared test helpers: small models of every family with random weights, randomised
BatchNorm statistics and router biases set so that routing is mixed; the per-run random
seed (fixture ``rng``); the ``cuda`` marker's skip on machines without a CUDA device.

TRITON_INTERPRET is set here, and only here, for the whole test process: without a GPU,
Triton kernels run on CPU tensors under the interpreter, which Triton reads when a kernel
is decorated, so it is set before anything imports them (pytest imports this file before
any test module). Every test module then sees the same mode, and ``dynexec.kernels`` is
imported as installed (the editable install maps it to the top-level kernels/ folder).
"""
from __future__ import annotations

import copy
import functools
import os
import random
import zlib

import torch  # (importing torch does not import any Triton kernel)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dynexec  # noqa: E402
from dynexec.tools.calibrate import calibrate, randomize_batchnorm  # noqa: E402

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
IMAGENET = {k for k, (name, _) in FAMILIES.items()
            if "imagenet" in name or name.startswith(("resnet", "R101"))}


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


# ---------------------------------------------------------------------- per-run random data
# Tests that want fresh random data on every run draw it from the ``rng`` fixture: a
# torch.Generator seeded from this run's seed and the test's id. The run's seed is drawn
# anew per run, shown in the header and in every failure report; DYNEXEC_TEST_SEED=<seed>
# replays a run.
def _session_seed() -> int:
    env = os.environ.get("DYNEXEC_TEST_SEED", "").strip()
    return int(env) if env else random.SystemRandom().randrange(2**31)


SEED = _session_seed()


def seed_for(nodeid: str) -> int:
    """The seed of one test in this run (stable for a given DYNEXEC_TEST_SEED)."""
    return (SEED * 1_000_003 + zlib.crc32(nodeid.encode())) % 2**63


@pytest.fixture
def rng(request) -> torch.Generator:
    """A CPU torch.Generator seeded for this test and run (see DYNEXEC_TEST_SEED)."""
    return torch.Generator().manual_seed(seed_for(request.node.nodeid))


def pytest_report_header(config):
    return f"dynexec random data: DYNEXEC_TEST_SEED={SEED} (set it to replay this run)"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"dynexec random data: DYNEXEC_TEST_SEED={SEED}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("random seed", f"DYNEXEC_TEST_SEED={SEED} (this test's seed: "
                                               f"{seed_for(item.nodeid)})"))
    return report


# ---------------------------------------------------------------------- markers
def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
