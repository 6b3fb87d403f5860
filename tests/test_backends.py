"""Backend selection and availability reporting."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dynexec.runtime.ops import backend_status, get_backend
from dynexec.runtime.ops import extension as _native


def test_auto_picks_native_on_cpu():
    assert backend_status("cpu")["native"][0], backend_status("cpu")["native"][1]
    assert get_backend("auto", "cpu").name == "native"


def test_native_on_cuda_needs_cuda_kernels():
    ok, reason = backend_status("cuda")["native"]
    if _native.extension_cuda_version() == 0:
        assert not ok and "without CUDA kernels" in reason
    else:
        assert ok


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*triton-graph"):
        get_backend("fast", "cpu")
    if _native.extension_cuda_version() == 0:
        with pytest.raises(RuntimeError, match="'native' is not available on cuda"):
            get_backend("native", "cuda")


def test_info_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "dynexec.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("native", "triton", "torch", "triton-graph", "auto -> native"):
        assert name in out.stdout
    assert f"CPU ISA {torch.backends.cpu.get_cpu_capability()}" in out.stdout
