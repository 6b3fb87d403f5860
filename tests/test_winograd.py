"""dynexec's Winograd F(2x2, 3x3) convolution (torch.ops.dynexec.winograd_weights /
conv3x3_winograd, csrc/ops/cpu/winograd_cpu.h) against F.conv2d in float64 on fresh seeded
random data: every channel count it takes, even / odd / 1x1 / 2x3 images (partial edge
tiles), empty / single / odd batches, NCHW, channels_last and non-contiguous inputs,
one and two threads, the AVX2 and AVX-512 tile products (bit for bit), and bad arguments.
Its use inside OneDnnChain is tested with the chain (tests/test_onednn_chain.py), inside the
engine in tests/test_engine.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dynexec  # noqa: F401  (loads dynexec._C)

pytestmark = pytest.mark.skipif(not torch.ops.dynexec.winograd_supported(),
                                reason="this CPU has no AVX2 + FMA (the Winograd kernel's instruction set)")
CL = torch.channels_last


def _conv(C, K, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(K, C, 3, 3, generator=gen) / (9 * C) ** 0.5
    return w, torch.randn(K, generator=gen) * 0.1


def _check(x, w, b):
    y = torch.ops.dynexec.conv3x3_winograd(x, torch.ops.dynexec.winograd_weights(w), b)
    want = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert y.shape == want.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=CL)
    # float32 direct convolutions are off by a few 1e-7 relative too (see winograd_cpu.h)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C,K", [(8, 16), (16, 16), (16, 32), (32, 32), (64, 64), (24, 48)])
@pytest.mark.parametrize("size", [(32, 32), (9, 9), (7, 4), (2, 3), (1, 1)])
def test_matches_conv2d(C, K, size):
    w, b = _conv(C, K, seed=C + K)
    for n in (3, 1, 0):
        x = torch.randn(n, C, *size, generator=torch.Generator().manual_seed(n + size[0]))
        _check(x.contiguous(memory_format=CL), w, b)


@pytest.mark.parametrize("layout", ["nchw", "cl", "strided", "channel-slice"])
def test_any_input_layout(layout):
    w, b = _conv(16, 32, seed=1)
    x = torch.randn(5, 16, 10, 11, generator=torch.Generator().manual_seed(2))
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":  # every other sample of a larger batch
        x = torch.cat([x, x]).contiguous(memory_format=CL)[::2]
    elif layout == "channel-slice":
        x = torch.cat([x, x], dim=1)[:, 8:24]
    _check(x, w, b)


def test_one_and_two_threads_agree_bitwise():
    w, b = _conv(32, 32, seed=3)
    U = torch.ops.dynexec.winograd_weights(w)
    x = torch.randn(7, 32, 16, 16, generator=torch.Generator().manual_seed(4)).contiguous(memory_format=CL)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.dynexec.conv3x3_winograd(x, U, b)
        torch.set_num_threads(2)
        two = torch.ops.dynexec.conv3x3_winograd(x, U, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each tile is computed the same way on whichever thread


# Each run: fresh seeded data, every block shape of the tile products (K % 32 == 0 and 16),
# edge tiles, a batch of 5; the outputs are saved for the parent process to compare.
_ISA_SCRIPT = """
import sys, torch, dynexec
outs = {}
for C, K, seed in ((8, 16, 1), (16, 16, 2), (16, 32, 3), (32, 32, 4), (64, 64, 5), (24, 48, 6), (32, 80, 7),
                   (64, 16, 8)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, C, 3, 3, generator=g) / (9 * C) ** 0.5
    b = torch.randn(K, generator=g)
    x = torch.randn(5, C, 11, 9, generator=g).contiguous(memory_format=torch.channels_last)
    outs[f"{C}x{K}"] = torch.ops.dynexec.conv3x3_winograd(x, torch.ops.dynexec.winograd_weights(w), b)
torch.save({"isa": torch.ops.dynexec.winograd_isa(), "outs": outs}, sys.argv[1])
"""


def _run_with_isa(isa, path):
    """The script above in a fresh process (the choice is read once per process)."""
    env = dict(os.environ, DYNEXEC_WINOGRAD_ISA=isa)
    return subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, capture_output=True,
                          text=True, timeout=300)


def _cpu_has_avx512():
    with open("/proc/cpuinfo") as f:
        return " avx512f" in f.read()


def test_isa_default_is_the_widest_the_cpu_has():
    assert torch.ops.dynexec.winograd_isa() == ("avx512" if _cpu_has_avx512() else "avx2")


@pytest.mark.slow
def test_avx2_and_default_isa_agree_bitwise(tmp_path):
    """Forced AVX2 against the default (AVX-512 where the CPU has it): the same
    multiply-adds in the same order per output, so the same bits."""
    default, forced = _run_with_isa("auto", tmp_path / "a.pt"), _run_with_isa("avx2", tmp_path / "b.pt")
    assert default.returncode == 0 and forced.returncode == 0, default.stderr + forced.stderr
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["isa"] == torch.ops.dynexec.winograd_isa() and b["isa"] == "avx2"
    assert a["outs"].keys() == b["outs"].keys()
    for key in a["outs"]:
        assert torch.equal(a["outs"][key], b["outs"][key]), key


@pytest.mark.slow
def test_bad_isa_setting_is_a_clear_error(tmp_path):
    bad = _run_with_isa("avx1024", tmp_path / "c.pt")
    assert bad.returncode != 0
    assert "DYNEXEC_WINOGRAD_ISA: expected auto, avx2 or avx512, got 'avx1024'" in bad.stderr
    required = _run_with_isa("avx512", tmp_path / "d.pt")
    if _cpu_has_avx512():
        assert required.returncode == 0, required.stderr
        assert torch.load(tmp_path / "d.pt", weights_only=True)["isa"] == "avx512"
    else:
        assert required.returncode != 0
        assert "DYNEXEC_WINOGRAD_ISA=avx512, but this CPU has no AVX-512" in required.stderr


def test_nan_and_inf_inputs_stay_in_their_sample():
    w, b = _conv(16, 16, seed=5)
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    x[0, 2, 3, 3] = float("nan")
    x[2, 5, 0, 7] = float("inf")
    y = torch.ops.dynexec.conv3x3_winograd(x, torch.ops.dynexec.winograd_weights(w), b)
    assert y[0].isnan().any() and not y[0, :, 6:, :].isnan().any()  # only tiles near the NaN
    assert y[1].isfinite().all()
    assert not y[2].isfinite().all()


def test_bad_arguments_name_what_was_expected():
    w, b = _conv(16, 16, seed=7)
    U = torch.ops.dynexec.winograd_weights(w)
    with pytest.raises(RuntimeError,
                       match=r"C a multiple of 8 and K a multiple of 16, "
                             r"got Float with shape \[16, 12, 3, 3\]"):
        torch.ops.dynexec.winograd_weights(torch.randn(16, 12, 3, 3))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.dynexec.winograd_weights(torch.randn(8, 8, 3, 3))
    with pytest.raises(RuntimeError, match=r"weight \[K, C, 3, 3\]"):
        torch.ops.dynexec.winograd_weights(torch.randn(16, 16, 5, 5))
    with pytest.raises(RuntimeError, match="float32 weight"):
        torch.ops.dynexec.winograd_weights(w.double())
    with pytest.raises(RuntimeError, match=r"transformed weights \[16, K / 16, C, 16\]"):
        torch.ops.dynexec.conv3x3_winograd(torch.randn(1, 16, 4, 4), w, b)
    with pytest.raises(RuntimeError,
                       match=r"float32 input \[N, 16, H, W\], got Float with shape \[1, 8, 4, 4\]"):
        torch.ops.dynexec.conv3x3_winograd(torch.randn(1, 8, 4, 4), U, b)
    with pytest.raises(RuntimeError, match=r"float32 input"):
        torch.ops.dynexec.conv3x3_winograd(torch.randn(1, 16, 4, 4, dtype=torch.float64), U, b)
    with pytest.raises(RuntimeError, match=r"float32 bias \[16\], got Float with shape \[15\]"):
        torch.ops.dynexec.conv3x3_winograd(torch.randn(1, 16, 4, 4), U, torch.randn(15))


def test_fake_kernels_give_the_real_shapes_and_layout():
    """torch.compile traces the ops through their fake kernels (dynexec/ops/fake.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dynexec.runtime.ops import fake
    fake.register()
    w, b = _conv(16, 32, seed=8)
    U = torch.ops.dynexec.winograd_weights(w)
    x = torch.randn(3, 16, 7, 6)
    real = torch.ops.dynexec.conv3x3_winograd(x, U, b)
    with FakeTensorMode() as mode:
        fw, fb, fx = mode.from_tensor(w), mode.from_tensor(b), mode.from_tensor(x)
        fU = torch.ops.dynexec.winograd_weights(fw)
        out = torch.ops.dynexec.conv3x3_winograd(fx, fU, fb)
    assert fU.shape == U.shape
    assert out.shape == real.shape and out.stride() == real.stride()
