"""Tests for dynexec.kernels.indexed_conv (Triton implicit-GEMM routed convolution).

Runs the Triton kernels on CPU tensors under the Triton interpreter when no GPU is
present (tests/conftest.py sets TRITON_INTERPRET=1 for the test process before any kernel
is imported), on CUDA tensors otherwise (those tests carry the ``cuda`` marker then).
"""
import copy
import itertools
import os
import random
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynexec.kernels import indexed_conv as ic

pytestmark = [pytest.mark.skipif(not ic.HAS_TRITON, reason="triton not installed")]

DEVICE = "cpu" if ic.INTERPRET else "cuda"
if DEVICE == "cuda" and ic.HAS_TRITON:
    pytestmark.append(pytest.mark.cuda)

try:  # the project's reference partition defines the idx/count contract
    from dynexec.runtime.ops.reference import partition
except ImportError:  # pragma: no cover
    def partition(mask):
        mask = mask.reshape(-1).bool()
        idx = torch.cat([torch.nonzero(mask)[:, 0], torch.nonzero(~mask)[:, 0]])
        return idx, torch.tensor(int(mask.sum()), dtype=torch.int64, device=mask.device)


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _random_bn(c, gen):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return bn.eval()


def _random_conv_bn(cin, cout, k, gen, conv_bias=False):
    """Random conv weight (+bias) and BN; returns (folded w fp32, folded b fp32)."""
    w = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=gen) * 0.1 if conv_bias else None
    return ic.fold_bn(w, b, _random_bn(cout, gen))


def _mask(n_total, count, gen):
    perm = torch.randperm(n_total, generator=gen)
    mask = torch.zeros(n_total, dtype=torch.bool)
    mask[perm[:count]] = True
    return mask


def _routing(n_total, count, gen):
    idx, cnt = partition(_mask(n_total, count, gen).to(DEVICE))
    assert int(cnt) == count
    return idx, cnt


_FLOOR = {torch.float16: 1e-6, torch.bfloat16: 1e-6}


def _assert_close(actual, ref64, torch_lowp, dtype, tf32=False):
    """actual: kernel rows; ref64: float64 reference rows; torch_lowp: PyTorch's own
    computation in `dtype` (only for fp16/bf16)."""
    assert actual.shape == ref64.shape
    if actual.numel() == 0:
        return
    err = (actual.double() - ref64).abs()
    scale = ref64.abs().max().item()
    if dtype in (torch.float16, torch.bfloat16):
        err_torch = (torch_lowp.double() - ref64).abs().max().item()
        assert err.max().item() <= 2.0 * err_torch + _FLOOR[dtype], (err.max().item(), err_torch)
    elif dtype == torch.float32 and tf32:
        # The interpreter computes exact fp32; on a GPU TF32 has a 10-bit mantissa.
        assert err.max().item() <= 5e-3 * max(scale, 1e-6)
    else:
        rtol = 1e-4 if dtype == torch.float32 else 1e-10
        tol = rtol * ref64.abs() + rtol * 0.1 * max(scale, 1e-6)
        assert bool((err <= tol).all()), err.max().item()


# ----------------------------------------------------------------------------------
# main parametrised test: one conv configuration vs F.conv2d (+ folded BN, residual)
# ----------------------------------------------------------------------------------
DTYPES = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="fp32-tf32"),
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float64, False, id="fp64"),
]
GEOMS = [(3, 1), (3, 2), (1, 1), (1, 2)]
MODES = ["gather_compact", "compact_compact", "compact_residual_scatter", "gather_scatter"]
COUNTS = ["zero", "one", "partial", "full"]


def _shape_for(case_id):
    """Deterministic small shape per case, cycling odd/even sizes and channels."""
    r = random.Random(case_id)
    n_total = r.choice([4, 5, 6])
    h = r.choice([4, 5, 8])
    w = r.choice([4, 5, 8])
    cin = r.choice([3, 5, 8, 16])
    cout = r.choice([5, 8, 16])
    return n_total, h, w, cin, cout


@pytest.mark.parametrize("count_kind", COUNTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,stride", GEOMS)
@pytest.mark.parametrize("dtype,tf32", DTYPES)
def test_indexed_conv_matches_conv2d(dtype, tf32, k, stride, mode, count_kind):
    case_id = f"{dtype}-{tf32}-{k}-{stride}-{mode}-{count_kind}"
    gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    n_total, h, w, cin, cout = _shape_for(case_id)
    count = {"zero": 0, "one": 1, "partial": max(2, n_total // 2), "full": n_total}[count_kind]
    idx, cnt = _routing(n_total, count, gen)
    rows = idx[:count]
    local = torch.arange(count, device=DEVICE)

    wf, bf = _random_conv_bn(cin, cout, k, gen, conv_bias=(k == 1))
    wp = ic.pack_weight(wf, dtype).to(DEVICE)
    bias = bf.to(DEVICE)
    gather = mode.startswith("gather")
    scatter = mode.endswith("scatter")
    use_res = mode == "compact_residual_scatter"
    relu = mode != "compact_compact" or k == 1  # exercise relu=False too
    hout = (h + 2 * ((k - 1) // 2) - k) // stride + 1
    wout = (w + 2 * ((k - 1) // 2) - k) // stride + 1

    x = _nhwc(torch.randn(n_total, cin, h, w, generator=gen)).to(dtype).to(DEVICE)
    # compact input: only the first `count` samples are meaningful; the rest is junk
    # that must never be read.
    sentinel = 7.0
    if scatter:
        out = _nhwc(torch.randn(n_total, cout, hout, wout, generator=gen)).to(dtype).to(DEVICE)
    else:
        out = torch.full((n_total, cout, hout, wout), sentinel, dtype=dtype, device=DEVICE)
        out = _nhwc(out)
    out_before = out.clone()
    residual = out if use_res else None  # identity shortcut: residual IS the output

    kw = dict(kernel_size=k, stride=stride, idx=idx, count=cnt, gather=gather, relu=relu,
              residual=residual, scatter=scatter)
    res = ic.indexed_conv2d(x, wp, bias, out=out, allow_tf32=tf32, **kw)
    assert res is out

    # float64 reference built directly from F.conv2d on the selected rows.
    x_sel = x.index_select(0, rows if gather else local).double()
    w64 = ic.unpack_weight(wp, k).double()
    ref = F.conv2d(x_sel, w64, bias.double(), stride=stride, padding=(k - 1) // 2)
    if use_res:
        ref = ref + out_before.index_select(0, rows).double()
    if relu:
        ref = torch.relu(ref)
    # PyTorch's own computation in the low-precision dtype (same API, same weights).
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        o2 = out_before.clone()
        ic.indexed_conv2d_reference(x, wp, bias, out=o2, **dict(kw, residual=o2 if use_res else None))
        lowp = o2.index_select(0, rows if scatter else local)

    dst = rows if scatter else local
    _assert_close(out.index_select(0, dst), ref, lowp, dtype, tf32)
    # everything not written by the launch is untouched (bitwise)
    untouched = torch.ones(n_total, dtype=torch.bool, device=DEVICE)
    untouched[dst] = False
    assert torch.equal(out[untouched], out_before[untouched])


# ----------------------------------------------------------------------------------
# reference implementation agrees with F.conv2d + BN module (validates the oracle)
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride", GEOMS)
def test_fold_bn_pack_and_reference(k, stride):
    gen = torch.Generator().manual_seed(1000 + 10 * k + stride)
    cin, cout = 5, 8
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
        conv.bias.copy_(torch.randn(cout, generator=gen) * 0.1)
    bn = _random_bn(cout, gen)
    wf, bf = ic.fold_bn(conv.weight, conv.bias, bn)
    assert wf.dtype == bf.dtype == torch.float32
    wp = ic.pack_weight(wf)
    assert wp.shape == (k * k * cin, cout) and wp.is_contiguous()
    # K ordered (kh, kw, cin)
    assert torch.equal(wp[(0 * k + (k - 1)) * cin + 2], wf[:, 2, 0, k - 1])
    assert torch.equal(ic.unpack_weight(wp, k), wf)

    x = _nhwc(torch.randn(4, cin, 5, 5, generator=gen))
    idx, cnt = partition(torch.tensor([True, False, True, True]))
    with torch.no_grad():
        expect = torch.relu(bn(conv(x)))
    got = ic.indexed_conv2d_reference(x, wp, bf, kernel_size=k, stride=stride, idx=idx, count=cnt,
                                      gather=True, relu=True)
    torch.testing.assert_close(got[:3], expect[idx[:3]], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# count is read on the device; the grid is sized for the full batch
# ----------------------------------------------------------------------------------
def test_count_read_from_device_and_grid_is_routing_independent(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    n_total, cin, cout, h = 6, 8, 8, 5
    x = _nhwc(torch.randn(n_total, cin, h, h, generator=gen)).to(DEVICE)
    wf, bf = _random_conv_bn(cin, cout, 3, gen)
    wp, bias = ic.pack_weight(wf).to(DEVICE), bf.to(DEVICE)

    # A routing with 5 active samples, but the count tensor says 2: the launch covers
    # all 6 samples, the kernel reads 2 and must only produce 2 compact rows.
    idx, _ = _routing(n_total, 5, gen)
    cnt = torch.tensor(2, dtype=torch.int64, device=DEVICE)
    out = _nhwc(torch.full((n_total, cout, h, h), -3.0, device=DEVICE))

    # The launcher must not read count on the host (that would be a device->host sync).
    def _no_host_read(*a, **k):
        raise AssertionError("launcher read count on the host")

    launches = []
    real_kernel = ic._indexed_conv2d_kernel

    class _Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_kernel[grid]

    monkeypatch.setattr(ic, "_indexed_conv2d_kernel", _Spy())
    kw = dict(kernel_size=3, stride=1, idx=idx, count=cnt, gather=True, relu=True, out=out)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", _no_host_read)
        m.setattr(torch.Tensor, "tolist", _no_host_read)
        ic.indexed_conv2d(x, wp, bias, **kw)
    ref = ic.indexed_conv2d_reference(x, wp, bias, **dict(kw, out=None))
    torch.testing.assert_close(out[:2], ref[:2], rtol=1e-4, atol=1e-5)
    assert bool((out[2:] == -3.0).all())

    # Same tensors, new routing written in place (as a CUDA-graph replay would see):
    # the identical launch (same grid) now produces 4 rows.
    new_idx, new_cnt = _routing(n_total, 4, gen)
    idx.copy_(new_idx)
    cnt.copy_(new_cnt)
    ic.indexed_conv2d(x, wp, bias, **kw)
    assert launches[0] == launches[1]
    ref = ic.indexed_conv2d_reference(x, wp, bias, **dict(kw, out=None))
    torch.testing.assert_close(out[:4], ref[:4], rtol=1e-4, atol=1e-5)
    assert bool((out[4:] == -3.0).all())

    # count larger than the batch is clamped to the grid; count 0 writes nothing.
    cnt.fill_(0)
    before = out.clone()
    ic.indexed_conv2d(x, wp, bias, **kw)
    assert torch.equal(out, before)
    cnt.fill_(100)
    ic.indexed_conv2d(x, wp, bias, **kw)
    ref = ic.indexed_conv2d_reference(x, wp, bias, **dict(kw, out=None))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------
# basic blocks built from two launches
# ----------------------------------------------------------------------------------
class _RefBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, gen):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _random_bn(cout, gen)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _random_bn(cout, gen)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _random_bn(cout, gen))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    fan_in = m.weight[0].numel()
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in ** 0.5)
        self.eval()

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("count", [0, 1, 3, 5])
def test_basic_block_identity_two_launches(count, dtype):
    gen = torch.Generator().manual_seed(31 + count)
    n_total, c, h = 5, 8, 5
    blk = _RefBasicBlock(c, c, 1, gen)
    w1, b1 = ic.fold_bn(blk.conv1.weight, None, blk.bn1)
    w2, b2 = ic.fold_bn(blk.conv2.weight, None, blk.bn2)
    w1p, w2p = ic.pack_weight(w1, dtype).to(DEVICE), ic.pack_weight(w2, dtype).to(DEVICE)
    b1, b2 = b1.to(DEVICE), b2.to(DEVICE)

    x0 = _nhwc(torch.randn(n_total, c, h, h, generator=gen)).to(dtype)
    idx, cnt = _routing(n_total, count, gen)
    x = x0.clone().to(DEVICE)  # the running full-batch activation, updated in place
    ws = _nhwc(torch.empty(n_total, c, h, h, dtype=dtype, device=DEVICE))  # compact workspace

    ic.indexed_conv2d(x, w1p, b1, kernel_size=3, stride=1, idx=idx, count=cnt,
                      gather=True, relu=True, out=ws)
    ic.indexed_conv2d(ws, w2p, b2, kernel_size=3, stride=1, idx=idx, count=cnt,
                      gather=False, relu=True, residual=x, out=x, scatter=True)

    rows = idx[:count].cpu()
    with torch.no_grad():
        ref64 = copy.deepcopy(blk).double()(x0.double()[rows]) if count else x0.double()[:0]
    active = x.cpu()[rows]
    if dtype == torch.float32:
        torch.testing.assert_close(active.double(), ref64, rtol=1e-4, atol=1e-5)
    else:
        # bf16 through two convs: compare with PyTorch's own bf16 block (2x bound)
        with torch.no_grad():
            ref_lp = copy.deepcopy(blk).to(dtype)(x0[rows]) if count else x0[:0]
        _assert_close(active, ref64, ref_lp, dtype)
    inactive = torch.ones(n_total, dtype=torch.bool)
    inactive[rows] = False
    assert torch.equal(x.cpu()[inactive], x0[inactive])


@pytest.mark.parametrize("count", [0, 2, 4])
def test_basic_block_projection_shortcut(count):
    """Downsampling block (16->32? kept small: 5->8, stride 2) with a 1x1 projection:
    shortcut and conv1 store compactly, conv2 adds the *compact* residual
    (residual_gather=False) and scatters into the stage's output tensor."""
    gen = torch.Generator().manual_seed(77 + count)
    n_total, cin, cout, h = 4, 5, 8, 8
    blk = _RefBasicBlock(cin, cout, 2, gen)
    w1, b1 = ic.fold_bn(blk.conv1.weight, None, blk.bn1)
    w2, b2 = ic.fold_bn(blk.conv2.weight, None, blk.bn2)
    ws_, bs_ = ic.fold_bn(blk.shortcut[0].weight, None, blk.shortcut[1])
    x = _nhwc(torch.randn(n_total, cin, h, h, generator=gen)).to(DEVICE)
    idx, cnt = _routing(n_total, count, gen)
    common = dict(stride=2, idx=idx, count=cnt, gather=True)
    sc = ic.indexed_conv2d(x, ic.pack_weight(ws_).to(DEVICE), bs_.to(DEVICE), kernel_size=1, relu=False,
                           **common)
    t = ic.indexed_conv2d(x, ic.pack_weight(w1).to(DEVICE), b1.to(DEVICE), kernel_size=3, relu=True, **common)
    y = _nhwc(torch.full((n_total, cout, h // 2, h // 2), 5.0, device=DEVICE))
    ic.indexed_conv2d(t, ic.pack_weight(w2).to(DEVICE), b2.to(DEVICE), kernel_size=3, stride=1, idx=idx,
                      count=cnt, gather=False, relu=True, residual=sc, residual_gather=False,
                      out=y, scatter=True)
    rows = idx[:count].cpu()
    with torch.no_grad():
        ref = blk(x.cpu()[rows]) if count else torch.empty(0, cout, h // 2, h // 2)
    torch.testing.assert_close(y.cpu()[rows], ref, rtol=1e-4, atol=1e-5)
    inactive = torch.ones(n_total, dtype=torch.bool)
    inactive[rows] = False
    assert bool((y.cpu()[inactive] == 5.0).all())


# ----------------------------------------------------------------------------------
# randomised: shapes, tiles, routing, modes (fp32, IEEE)
# ----------------------------------------------------------------------------------
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(
        n_total=st.integers(1, 6), h=st.integers(2, 7), w=st.integers(2, 7),
        cin=st.integers(1, 20), cout=st.integers(1, 20), k=st.sampled_from([1, 3]),
        stride=st.sampled_from([1, 2]), mode=st.sampled_from(MODES), data=st.data(),
        tiles=st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32]), st.sampled_from([16, 32])),
    )
    def test_random_configurations(n_total, h, w, cin, cout, k, stride, mode, data, tiles):
        count = data.draw(st.integers(0, n_total), label="count")
        seed = data.draw(st.integers(0, 2 ** 16), label="seed")
        gen = torch.Generator().manual_seed(seed)
        idx, cnt = _routing(n_total, count, gen)
        wf, bf = _random_conv_bn(cin, cout, k, gen)
        wp = ic.pack_weight(wf).to(DEVICE)
        gather, scatter = mode.startswith("gather"), mode.endswith("scatter")
        use_res = mode == "compact_residual_scatter"
        hout, wout = (h + 2 * ((k - 1) // 2) - k) // stride + 1, (w + 2 * ((k - 1) // 2) - k) // stride + 1
        x = _nhwc(torch.randn(n_total, cin, h, w, generator=gen)).to(DEVICE)
        out = _nhwc(torch.randn(n_total, cout, hout, wout, generator=gen)).to(DEVICE)
        ref_out = out.clone()
        kw = dict(kernel_size=k, stride=stride, idx=idx, count=cnt, gather=gather, relu=True, scatter=scatter)
        cfg = dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], BLOCK_K=tiles[2], num_warps=4, num_stages=2)
        ic.indexed_conv2d(x, wp, bf.to(DEVICE), out=out, residual=out if use_res else None, config=cfg, **kw)
        ref64 = ref_out.double()
        ic.indexed_conv2d_reference(x.double(), wp.double(), bf.double().to(DEVICE), out=ref64,
                                    residual=ref64 if use_res else None, **kw)
        torch.testing.assert_close(out.double(), ref64, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------
# configs and argument checking
# ----------------------------------------------------------------------------------
def test_config_table_and_heuristic():
    keys = list(ic.CONFIGS) + [(3, 7, 3, 1), (48, 96, 3, 2), (4096, 4096, 1, 1)]
    for (cin, cout, k, s), dt in itertools.product(keys, [torch.float16, torch.float32]):
        cfg = ic.get_config(cin, cout, k, s, dt)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = cfg[key]
            assert v >= 16 and v & (v - 1) == 0, (key, v)
        assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1
    # returned dicts are copies
    ic.get_config(16, 16, 3, 1)["BLOCK_M"] = 1
    assert ic.CONFIGS[(16, 16, 3, 1)]["BLOCK_M"] != 1


def test_small_config_override_and_multi_tile():
    """Force small tiles so M, N and K all span several tiles (masking at tile edges)."""
    gen = torch.Generator().manual_seed(3)
    n_total, cin, cout, h = 3, 20, 40, 5
    x = _nhwc(torch.randn(n_total, cin, h, h, generator=gen)).to(DEVICE)
    wf, bf = _random_conv_bn(cin, cout, 3, gen)
    wp = ic.pack_weight(wf).to(DEVICE)
    idx, cnt = _routing(n_total, 2, gen)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
    kw = dict(kernel_size=3, stride=2, idx=idx, count=cnt, gather=True, relu=True)
    got = ic.indexed_conv2d(x, wp, bf.to(DEVICE), config=cfg, **kw)
    ref = ic.indexed_conv2d_reference(x.double(), wp.double(), bf.double().to(DEVICE), **kw)
    torch.testing.assert_close(got[:2].double(), ref[:2], rtol=1e-4, atol=1e-5)


def test_argument_errors():
    x = _nhwc(torch.randn(2, 4, 4, 4)).to(DEVICE)
    wp = ic.pack_weight(torch.randn(8, 4, 3, 3)).to(DEVICE)
    idx, cnt = partition(torch.tensor([True, False]).to(DEVICE))
    base = dict(kernel_size=3, stride=1, idx=idx, count=cnt, gather=True, relu=False)
    with pytest.raises(ValueError, match="scatter"):
        ic.indexed_conv2d(x, wp, None, **dict(base, scatter=True))
    with pytest.raises(ValueError, match="w_packed"):
        ic.indexed_conv2d(x, wp, None, **dict(base, kernel_size=1))
    with pytest.raises(ValueError, match="count"):
        ic.indexed_conv2d(x, wp, None, **dict(base, count=torch.tensor([1])))
    with pytest.raises(TypeError):
        ic.indexed_conv2d(x.half(), wp, None, **base)
    with pytest.raises(ValueError, match="idx"):
        ic.indexed_conv2d(x, wp, None, **dict(base, idx=None))


# ----------------------------------------------------------------------------------
# the kernel must also compile for real GPUs (catches interpreter-only constructs)
# ----------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dynexec.kernels import indexed_conv as ic
assert not ic.INTERPRET
fn = ic._indexed_conv2d_kernel
consts = dict(KH=3, KW=3, STRIDE=2, PAD=1, GATHER=True, SCATTER=True, HAS_BIAS=True, HAS_RES=True,
              RES_GATHER=True, RELU=True, INPUT_PRECISION="ieee", DOT_UPCAST=False, BF16_RTNE=False,
              ACC_DTYPE=tl.float32)
cfg = ic.get_config(32, 64, 3, 2, __import__("torch").bfloat16)
consts.update(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
sig = {}
for n in fn.arg_names:
    if n in consts: sig[n] = "constexpr"
    elif n == "bias_ptr": sig[n] = "*fp32"
    elif n in ("idx_ptr", "count_ptr"): sig[n] = "*i64"
    elif n.endswith("_ptr"): sig[n] = "*bf16"
    else: sig[n] = "i32"
src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
k = triton.compile(src, target=GPUTarget("cuda", int(sys.argv[1]), 32),
                   options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
ptx = k.asm["ptx"]
print("MMA" if "mma" in ptx else "NO-MMA")
"""


@pytest.mark.skipif(not ic.HAS_TRITON, reason="triton not installed")
def test_kernel_compiles_to_ptx_for_sm80(tmp_path):
    """Compile (no GPU needed) the bf16 gather+residual+scatter variant for sm_80 in a
    fresh process without TRITON_INTERPRET and check that tl.dot became MMA."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = tmp_path / "compile_indexed_conv.py"
    script.write_text(_COMPILE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "80"], env=env, capture_output=True, text=True,
                          timeout=600)
    no_backend = "ptxas" in proc.stderr.lower() or "No module named 'triton.backends" in proc.stderr
    if proc.returncode != 0 and no_backend:
        pytest.skip("CUDA backend toolchain unavailable: " + proc.stderr[-300:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("MMA") and "NO-MMA" not in proc.stdout
