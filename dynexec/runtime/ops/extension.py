"""Loader of the native extension ``dynexec._C`` (ops ``torch.ops.dynexec.*``).

``load()`` imports the extension (which registers the C++/CUDA kernels), checks that it
was compiled against the same CUDA version as the running torch, and registers the fake
(meta) kernels from ``dynexec.runtime.ops.fake`` so the ops work under torch.compile / FakeTensor.
It never warns; callers decide how to report an unavailable extension.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

_result: Optional[tuple[Optional[ModuleType], Optional[str]]] = None


def _version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def extension_cuda_version() -> int:
    """CUDA_VERSION the extension was built with (e.g. 13000), 0 for a CPU-only build."""
    return int(torch.ops.dynexec.cuda_version())


def _check_cuda_version() -> None:
    ext = extension_cuda_version()
    if ext == 0:
        return  # CPU-only build: works with any torch (CUDA tensors have no kernel)
    ext_str = _version_str(ext)
    torch_cuda = torch.version.cuda
    if torch_cuda is None:
        raise RuntimeError(
            f"dynexec._C was built with CUDA {ext_str}, but this torch ({torch.__version__}) has no "
            "CUDA support. Rebuild dynexec against this torch: "
            "pip install -e . --no-build-isolation (DYNEXEC_CUDA=0 for a CPU-only build).")
    t_major, t_minor = (int(p) for p in torch_cuda.split(".")[:2])
    if (t_major, t_minor) != (ext // 1000, (ext % 1000) // 10):
        raise RuntimeError(
            f"dynexec._C was built with CUDA {ext_str}, but torch {torch.__version__} uses CUDA "
            f"{torch_cuda}. Rebuild dynexec against this torch: pip install -e . --no-build-isolation")


def load() -> tuple[Optional[ModuleType], Optional[str]]:
    """Returns (module, None) if the extension works, else (None, reason).

    Raises RuntimeError if the extension's CUDA version differs from torch.version.cuda.
    The result is cached, except that a version mismatch raises on every call."""
    global _result
    if _result is not None:
        return _result
    try:
        module = importlib.import_module("dynexec._C")
    except (ImportError, OSError) as exc:
        _result = (None, f"cannot import dynexec._C ({type(exc).__name__}: {exc}); build it with "
                         "`pip install -e . --no-build-isolation`")
        return _result
    if not hasattr(torch.ops.dynexec, "cuda_version"):
        _result = (None, f"dynexec._C ({getattr(module, '__file__', '?')}) loaded but registered "
                         "no torch.ops.dynexec ops")
        return _result
    _check_cuda_version()
    from . import fake
    fake.register()
    _result = (module, None)
    return _result
