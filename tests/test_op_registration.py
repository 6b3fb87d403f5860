"""The ops registered under torch.ops.dynexec, as torch.compile and torch.library see them.

(a) Every op with a fake (meta) kernel - the native ones (dynexec._C, fakes in
    dynexec/runtime/ops/fake.py) and the Triton ones (dynexec.kernels.ops) - is called
    inside a small function compiled with ``torch.compile(fullgraph=True,
    backend="aot_eager")`` (dynamo traces it through the fake kernel, AOTAutograd
    functionalizes the mutating ops) and compared with the same function run eagerly,
    outputs and mutated arguments alike. Every op that takes a tensor must have a fake
    kernel, and every op with one must have a case here. One routed block is also
    compiled with the default backend (Inductor) on CPU.
(b) torch.library.opcheck of the Winograd ops (winograd_weights, conv3x3_winograd and
    the queries winograd_supported / winograd_isa) on fresh random data; skipped only
    where dynexec.runtime.program.winograd_available() is False (a CPU without AVX2 + FMA,
    or dynexec._C built without oneDNN).

The inputs are the op tests' own opcheck cases (tests/test_native_ops.py,
tests/test_gate_ops.py) plus the Winograd and head cases below, drawn from the ``rng``
fixture (tests/conftest.py): fresh on every run, seed in the header and failure reports.
CUDA variants carry the ``cuda`` marker and are skipped without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynexec.runtime.ops import extension as _native
from dynexec.runtime.program import winograd_available

from test_gate_ops import OPCHECK_CASES as GATE_CASES
from test_native_ops import OPCHECK_CASES as NATIVE_CASES

_C, _REASON = _native.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"native extension dynexec._C is not available: {_REASON}")

try:  # registers the torch.ops.dynexec.triton_* ops
    from dynexec.kernels import ops as triton_ops
    from dynexec.kernels import regroup as _regroup
    TRITON_DEVICE = "cpu" if _regroup.kernels_interpreted() else "cuda"
except Exception:  # triton missing: no triton_* ops registered
    triton_ops = None
    TRITON_DEVICE = None

WINOGRAD = winograd_available()
NO_WINOGRAD = ("the Winograd kernel is not available here: dynexec.runtime.program.winograd_available() "
               "is False (this CPU lacks AVX2 + FMA, or dynexec._C was built without oneDNN)")
# Queries with no tensor argument (nothing to trace): they need no fake kernel.
QUERIES = {"cuda_version", "onednn_version", "onednn_plan_count", "onednn_plan_impls",
           "winograd_supported", "winograd_isa"}


def _dynexec_ops() -> list[str]:
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("dynexec::"))


def _has_fake(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dynexec::{name}", "Meta")


def _takes_tensors(name: str) -> bool:
    schema = getattr(torch.ops.dynexec, name).default._schema
    return any("Tensor" in str(a.type) for a in schema.arguments)


# ----------------------------------------------------------------------------- cases
def _winograd_conv(g, c=16, k=32):
    w = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
    return w, torch.randn(k, generator=g) * 0.1


def _winograd_weights_case(g):
    return (_winograd_conv(g)[0],)


def _conv3x3_winograd_case(g):
    w, b = _winograd_conv(g)
    x = torch.randn(3, 16, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.ops.dynexec.winograd_weights(w), b


def _pooled_linear_case(sigmoid):
    def build(g):
        h = torch.randn(3, 8, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
        return h, torch.randn(5, 8, generator=g) / 8 ** 0.5, torch.randn(5, generator=g), sigmoid
    return build


def _cases_of(table: dict, op: str) -> list:
    return [build for _, (name, build) in sorted(table.items()) if name == op]


# op -> input builders (generator -> args); the op tests' opcheck cases where they have them
CASES = {op: _cases_of(NATIVE_CASES, op)
         for op in ("partition", "gather_rows", "scatter_residual_relu_", "downsample_b")}
CASES.update({op: _cases_of(GATE_CASES, op)
              for op in ("scatter_residual_relu_pool_", "relu_pool_", "recurrent_gate_step")})
CASES.update({
    "pooled_linear": [_pooled_linear_case(False), _pooled_linear_case(True)],
    "winograd_weights": [_winograd_weights_case],
    "conv3x3_winograd": [_conv3x3_winograd_case],
})
TRITON_OPS = ("partition", "gather_rows", "scatter_residual_relu_", "scatter_residual_relu_pool_",
              "relu_pool_", "downsample_b")
CASES.update({f"triton_{op}": CASES[op] for op in TRITON_OPS})
# native ops with a CUDA kernel (csrc/ops/cuda/)
NATIVE_CUDA = ("partition", "gather_rows", "scatter_residual_relu_", "scatter_residual_relu_pool_",
               "relu_pool_", "recurrent_gate_step", "downsample_b")


def _compile_params():
    params = []
    for op in sorted(CASES):
        for i in range(len(CASES[op])):
            if op.startswith("triton_"):
                marks = [pytest.mark.cuda] if TRITON_DEVICE == "cuda" else []
                params.append(pytest.param(op, i, TRITON_DEVICE or "cpu", marks=marks,
                                           id=f"{op}-{i}-{TRITON_DEVICE or 'cpu'}"))
                continue
            params.append(pytest.param(op, i, "cpu", id=f"{op}-{i}-cpu"))
            if op in NATIVE_CUDA:
                params.append(pytest.param(op, i, "cuda", marks=pytest.mark.cuda, id=f"{op}-{i}-cuda"))
    return params


def _skip_unless_runnable(op: str, device: str) -> None:
    if op.startswith("triton_"):
        if triton_ops is None or not triton_ops.is_available()[0]:
            pytest.skip("the Triton ops cannot run here" + (
                "" if triton_ops is None else f": {triton_ops.is_available()[1]}"))
    elif device == "cuda" and _native.extension_cuda_version() == 0:
        pytest.skip("dynexec._C is a CPU-only build (no CUDA kernels)")
    if op in ("winograd_weights", "conv3x3_winograd") and not WINOGRAD:
        pytest.skip(NO_WINOGRAD)


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _clone(args):
    return tuple(a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _assert_same(actual, expected, what):
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, equal_nan=True, msg=what)
    else:
        assert actual == expected, what


# ----------------------------------------------------------------------------- (a)
def test_every_tensor_op_has_a_fake_kernel_and_a_compile_case():
    names = _dynexec_ops()
    assert set(NATIVE_CUDA) | {"pooled_linear", "winograd_weights", "conv3x3_winograd"} <= set(names)
    without_fake = [n for n in names if _takes_tensors(n) and not _has_fake(n)]
    assert without_fake == [], f"ops taking tensors without a fake kernel: {without_fake}"
    assert {n for n in names if not _takes_tensors(n)} <= QUERIES
    with_fake = {n for n in names if _has_fake(n)}
    if triton_ops is not None:
        assert {f"triton_{op}" for op in TRITON_OPS} <= with_fake
    assert with_fake <= set(CASES), f"ops with a fake kernel but no compile case: {with_fake - set(CASES)}"
    assert all(CASES[op] for op in CASES), [op for op in CASES if not CASES[op]]


@pytest.mark.parametrize("op,case,device", _compile_params())
def test_compiles_fullgraph_and_matches_eager(op, case, device, rng):
    """fn(*args) = the op on args (mutated in place for the *_ ops), then the op's outputs
    and every tensor argument; compiled and eager runs get copies of the same args."""
    _skip_unless_runnable(op, device)
    args = _to(CASES[op][case](rng), device)
    overload = getattr(torch.ops.dynexec, op).default

    def fn(*a):
        return overload(*a), [t for t in a if isinstance(t, torch.Tensor)]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_args, compiled_args = _clone(args), _clone(args)
    want = fn(*eager_args)
    got = compiled(*compiled_args)
    _assert_same(got, want, f"{op} outputs and arguments after the call")
    _assert_same(compiled_args, eager_args, f"{op} arguments (in-place updates)")


def test_routed_block_compiles_with_inductor(rng):
    """partition -> gather_rows -> convolution + ReLU -> scatter_residual_relu_pool_, the
    pieces of one routed residual block, through Inductor's CPU code generation."""
    x = torch.randn(6, 8, 5, 5, generator=rng).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, generator=rng) / 72 ** 0.5
    mask = torch.zeros(6, dtype=torch.bool)
    mask[torch.randperm(6, generator=rng)[:4]] = True
    idx, _ = torch.ops.dynexec.partition(mask)

    def block(x, idx):
        y = torch.ops.dynexec.gather_rows(x, idx, 4)
        y = F.conv2d(y, w, padding=1).relu()
        out, pooled = x.clone(), x.new_zeros(x.shape[:2])
        torch.ops.dynexec.scatter_residual_relu_pool_(out, y, idx, 4, pooled)
        return out, pooled

    torch._dynamo.reset()
    got = torch.compile(block, fullgraph=True)(x, idx)
    want = block(x, idx)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (b)
needs_winograd = pytest.mark.skipif(not WINOGRAD, reason=NO_WINOGRAD)


def _winograd_input(layout, n, c, size, g):
    h, w = size
    if layout == "channels_last":
        return torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    if layout == "batch_strided":  # every other sample of a larger batch
        return torch.randn(2 * n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)[::2]
    if layout == "channel_slice":
        return torch.randn(n, 2 * c, h, w, generator=g)[:, c // 2:c // 2 + c]
    return torch.randn(n, c, h, w, generator=g)


# (C, K, batch, image size, input layout): every channel count the kernel takes in a few
# combinations, empty / single / odd batches, odd and 1x1 images, dense and strided inputs.
WINOGRAD_CONVS = [
    (8, 16, 3, (8, 8), "nchw"),
    (16, 32, 1, (5, 7), "channels_last"),
    (24, 48, 0, (4, 4), "channels_last"),
    (32, 16, 5, (1, 1), "nchw"),
    (16, 16, 2, (9, 6), "batch_strided"),
    (16, 32, 3, (6, 5), "channel_slice"),
]


@needs_winograd
@pytest.mark.parametrize("c,k,n,size,layout", WINOGRAD_CONVS, ids=lambda v: str(v).replace(" ", ""))
def test_opcheck_winograd(c, k, n, size, layout, rng):
    w, b = _winograd_conv(rng, c, k)
    torch.library.opcheck(torch.ops.dynexec.winograd_weights.default, (w,))
    U = torch.ops.dynexec.winograd_weights(w)
    x = _winograd_input(layout, n, c, size, rng)
    torch.library.opcheck(torch.ops.dynexec.conv3x3_winograd.default, (x, U, b))


@needs_winograd
def test_opcheck_winograd_weights_of_a_strided_weight(rng):
    w = torch.randn(3, 3, 8, 16, generator=rng).permute(3, 2, 0, 1)  # [16, 8, 3, 3], not contiguous
    assert not w.is_contiguous()
    torch.library.opcheck(torch.ops.dynexec.winograd_weights.default, (w,))


@needs_winograd
def test_opcheck_winograd_queries():
    """The queries take no tensor: opcheck's schema, autograd-registration and fake-tensor
    checks apply. (Its AOT-dispatch check cannot compare winograd_isa's str result, so
    that one is left out for it; the value is checked directly.)"""
    torch.library.opcheck(torch.ops.dynexec.winograd_supported.default, ())
    torch.library.opcheck(torch.ops.dynexec.winograd_isa.default, (),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert torch.ops.dynexec.winograd_supported() is True
    assert torch.ops.dynexec.winograd_isa() in ("avx2", "avx512")
