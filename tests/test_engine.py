"""The engine equals the official masked execution (the eager models) on every family."""
from __future__ import annotations

import pytest
import torch

import dynexec
from dynexec.runtime.ops import backend_status

from conftest import FAMILIES, input_size, make_model, rel_err

BACKENDS = [name for name, (ok, _) in backend_status("cpu").items() if ok]
TOL = 1e-5


def _x(family, n, seed=123, dtype=torch.float32):
    s = input_size(family)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _batches(family):
    return (1, 2, 7) if family in ("skipnet-imagenet-bottleneck", "resnet-imagenet",
                                   "blockdrop-imagenet", "skipnet-imagenet-basic") else (1, 2, 7, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_reference(family, backend):
    model = make_model(family)
    engine = dynexec.compile(model, backend=backend)
    mixed = False
    for n in _batches(family):
        x = _x(family, n, seed=n)
        ref_logits, ref_routing = model.forward_routing(x)
        logits, routing = engine(x, return_routing=True)
        assert routing.dtype == torch.bool and routing.shape == (n, model.num_blocks)
        assert torch.equal(routing, ref_routing), f"routing differs at batch {n}"
        assert rel_err(logits, ref_logits) <= TOL
        frac = routing[:, 1:].float().mean().item()
        mixed |= 0.0 < frac < 1.0
        if model.router == "online":
            assert routing[:, 0].all(), "SkipNet block 0 always runs"
    if model.router != "none":
        assert mixed, "the calibrated routing should be mixed"


ROUTED = sorted(f for f in FAMILIES if not f.startswith("resnet-"))


@pytest.mark.parametrize("family", ROUTED)
@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_all_and_none_routed(family, fraction):
    model = make_model(family, fraction=fraction)
    x = _x(family, 3)
    ref_logits, ref_routing = model.forward_routing(x)
    logits, routing = dynexec.compile(model)(x, return_routing=True)
    expected = torch.full_like(ref_routing, bool(fraction))
    if model.router == "online":
        expected[:, 0] = True
    assert torch.equal(ref_routing, expected)
    assert torch.equal(routing, ref_routing)
    assert rel_err(logits, ref_logits) <= TOL


@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_given_routing_and_options(fold_bn, channels_last):
    model = make_model("blockdrop-cifar")
    engine = dynexec.compile(model, backend="torch", fold_bn=fold_bn, channels_last=channels_last)
    x = _x("blockdrop-cifar", 5)
    routing = torch.rand(5, model.num_blocks, generator=torch.Generator().manual_seed(3)) > 0.5
    logits, used = engine(x, routing=routing, return_routing=True)
    assert torch.equal(used, routing)
    ref = model.resnet.forward_masked(x, routing)
    assert rel_err(logits, ref) <= TOL
    dense = engine(x, routing=torch.ones_like(routing))
    assert rel_err(dense, model.resnet.forward_full(x)) <= TOL


@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "skipnet-cifar-ffgate1", "skipnet-imagenet-basic"])
@pytest.mark.parametrize("fold_bn,channels_last", [(False, False), (True, False), (False, True)])
def test_skipnet_gate_lowering_options(family, fold_bn, channels_last):
    model = make_model(family)
    engine = dynexec.compile(model, fold_bn=fold_bn, channels_last=channels_last)
    x = _x(family, 3)
    ref_logits, ref_routing = model.forward_routing(x)
    logits, routing = engine(x, return_routing=True)
    assert torch.equal(routing, ref_routing)
    assert rel_err(logits, ref_logits) <= TOL


def test_input_layouts_and_no_mutation():
    model = make_model("skipnet-cifar-rnn")
    engine = dynexec.compile(model)
    base = _x("skipnet-cifar-rnn", 6)
    ref_logits, ref_routing = model.forward_routing(base)
    variants = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "non_contiguous": torch.stack([base, base], dim=-1)[..., 0],
        "batch_stride": torch.stack([base, base], dim=1)[:, 0],
    }
    for label, x in variants.items():
        before = x.clone()
        logits, routing = engine(x, return_routing=True)
        assert torch.equal(x, before), f"{label}: the engine modified its input"
        assert torch.equal(routing, ref_routing), label
        assert rel_err(logits, ref_logits) <= TOL, label


def test_empty_batch():
    for family in ("skipnet-cifar-rnn", "blockdrop-cifar", "resnet-cifar"):
        model = make_model(family, fraction=None)
        x = _x(family, 0)
        logits, routing = dynexec.compile(model)(x, return_routing=True)
        assert logits.shape == (0, model.num_classes)
        assert routing.shape == (0, model.num_blocks) and routing.dtype == torch.bool
        assert model(x).shape == (0, model.num_classes)


def test_float64_model():
    model = make_model("skipnet-cifar-ffgate1", dtype=torch.float64)
    x = _x("skipnet-cifar-ffgate1", 5, dtype=torch.float64)
    ref_logits, ref_routing = model.forward_routing(x)
    logits, routing = dynexec.compile(model)(x, return_routing=True)
    assert logits.dtype == torch.float64
    assert torch.equal(routing, ref_routing)
    assert rel_err(logits, ref_logits) <= 1e-12


def test_compile_errors():
    model = make_model("blockdrop-cifar", fraction=None)
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'.*available"):
        dynexec.compile(model, backend="cuda-magic")
    with pytest.raises(ValueError, match="eval-mode"):
        dynexec.compile(model.train())
    with pytest.raises(TypeError, match="dynexec can compile"):
        dynexec.compile(torch.nn.Linear(2, 2))
    engine = dynexec.compile(model.eval())
    x = _x("blockdrop-cifar", 2)
    with pytest.raises(ValueError, match=r"shape \[2, 8\]"):
        engine(x, routing=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        engine(x, routing=torch.ones(2, 8))


needs_onednn = pytest.mark.skipif(not dynexec.runtime.program.onednn_direct_available(),
                                  reason="dynexec._C built without oneDNN")
needs_winograd = pytest.mark.skipif(not dynexec.runtime.program.winograd_available(),
                                    reason="no Winograd kernel on this CPU / build")
CONV_IMPLS = [c for c, ok in (("winograd", dynexec.runtime.program.winograd_available()),
                                ("onednn", dynexec.runtime.program.onednn_direct_available()),
                                ("mkldnn", dynexec.runtime.program.onednn_packing_available())) if ok]


@pytest.mark.parametrize("convolutions", CONV_IMPLS)
@pytest.mark.parametrize("backend", [b for b in ("native", "torch") if backend_status("cpu")[b][0]])
@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "blockdrop-cifar", "skipnet-imagenet-bottleneck"])
def test_packed_convolutions_used_and_exact_layout(family, backend, convolutions):
    """CPU float32 NHWC programs run their folded convolutions on pre-packed weights (the
    fast paths the benchmarks measure: dynexec's own oneDNN chains or torch's oneDNN op);
    NCHW and float64 programs keep F.conv2d. Same logits and routing either way."""
    model = make_model(family)
    packed = dynexec.compile(model, backend=backend, convolutions=convolutions)
    plain = dynexec.compile(model, backend=backend, channels_last=False)
    assert packed.program.convolutions == convolutions and f"convolutions={convolutions}" in repr(packed)
    for b in packed.program.blocks:
        if convolutions in ("onednn", "winograd"):
            assert b.branch.fused is not None
        else:
            assert all(c.packed is not None for c in b.branch.convs)
    if convolutions == "winograd":  # the 3x3 stride-1 convolutions of the blocks run on it
        assert sum(b.branch.fused.winograd_convs() for b in packed.program.blocks) > 0
    assert all(c.packed is None for b in plain.program.blocks for c in b.branch.convs)
    assert all(b.branch.fused is None for b in plain.program.blocks)
    for n in (7, 1, 3):
        x = _x(family, n, seed=n)
        (a, ra), (b, rb) = packed(x, return_routing=True), plain(x, return_routing=True)
        assert torch.equal(ra, rb)
        assert rel_err(a, b) < 1e-5
    double = dynexec.compile(make_model(family).double(), convolutions=convolutions)
    assert all(c.packed is None for b in double.program.blocks for c in b.branch.convs)
    assert all(b.branch.fused is None for b in double.program.blocks)


def test_unknown_or_unavailable_convolutions_are_refused():
    model = make_model("blockdrop-cifar")
    with pytest.raises(ValueError, match="convolutions must be one of auto, winograd, onednn, mkldnn, aten"):
        dynexec.compile(model, convolutions="fft")
    aten = dynexec.compile(model, convolutions="aten")
    assert all(c.packed is None for b in aten.program.blocks for c in b.branch.convs)


@pytest.mark.parametrize("backend", [b for b in ("native", "triton", "torch")
                                     if backend_status("cpu")[b][0]])
@pytest.mark.parametrize("rows", ["none", "one", "some", "all"])
def test_pooled_block_matches_block_then_mean(backend, rows):
    """The online engine's block step that also pools its output (cached means for the
    rows an identity block skips, fused pooling for the rows it runs) equals running the
    block and then taking the spatial mean, for every kind of mask."""
    model = make_model("skipnet-cifar-rnn")
    engine = dynexec.compile(model, backend=backend, executor="python")
    n = 7
    gen = torch.Generator().manual_seed(3)
    mask = {"none": torch.zeros(n, dtype=torch.bool),
            "one": torch.arange(n) == 4,
            "some": torch.rand(n, generator=gen) < 0.5,
            "all": torch.ones(n, dtype=torch.bool)}[rows]
    for k, block in enumerate(engine.program.blocks):
        if block.shortcut_kind != "identity":
            continue
        c = block.out_channels
        size = {16: 32, 32: 16, 64: 8}[c]
        h = torch.randn(n, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            expected = engine.executor.run_block(block, h.clone(), mask, int(mask.sum()))
            cache = h.mean(dim=(2, 3)).contiguous()
            out, pooled = engine.executor.run_block_pooled(block, h.clone(), mask, int(mask.sum()), cache)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(pooled, expected.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "skipnet-cifar-rnn-rl", "skipnet-imagenet-basic",
                                    "skipnet-imagenet-bottleneck", "skipnet-cifar-ffgate1"])
@pytest.mark.parametrize("convolutions", [c for c in ("onednn", "winograd") if c in CONV_IMPLS])
def test_native_recurrent_loop_equals_the_python_loop(family, convolutions):
    """Recurrent-gate programs on OneDnnChains run their block loop, gates included, in C++
    (BlockLoop.forward) with the native backend; it gives exactly the Python loop's
    logits and routing for every batch size, routing mix and NaN input (with the Winograd
    kernel, both pool a routed block's output in its output pass, in the same order).
    Feed-forward gates keep the Python loop."""
    model = make_model(family)
    engine = dynexec.compile(model, backend="native", convolutions=convolutions)
    if "ffgate" in family:
        assert engine.program.executor == "python"
        return
    loop = engine.program.cpu_loop.loop
    assert engine.program.executor == "cpu-loop" and loop.has_recurrent_gate()
    assert loop.num_blocks() == engine.num_blocks
    python_loop = dynexec.compile(model, backend="native", convolutions=convolutions, executor="python")
    assert python_loop.program.executor == "python"
    for n in (1, 2, 7, 16):
        x = _x(family, n, seed=40 + n)
        (a, ra), (b, rb) = engine(x, return_routing=True), python_loop(x, return_routing=True)
        assert torch.equal(ra, rb) and torch.equal(a, b)
        assert 0 < ra[:, 1:].float().mean() < 1 or n == 1  # mixed routing exercised
    x = _x(family, 4, seed=3)
    x[1] = float("nan")
    (a, ra), (b, rb) = engine(x, return_routing=True), python_loop(x, return_routing=True)
    assert torch.equal(ra, rb) and torch.equal(a.isnan(), b.isnan())
    assert a[1].isnan().all() and not a[0].isnan().any()


@needs_onednn
@pytest.mark.parametrize("family", ["blockdrop-cifar", "blockdrop-imagenet", "resnet-imagenet",
                                    "resnet-cifar", "skipnet-cifar-rnn"])
def test_native_planned_loop_equals_the_python_loop(family):
    """Routings known up front (BlockDrop's policy, a forced routing: all, none, random,
    alternating) run in C++ (BlockLoop.forward, identity / projection / DownsampleB shortcuts) with
    the native backend, giving exactly the Python loop's logits."""
    model = make_model(family)
    engine = dynexec.compile(model, backend="native", convolutions="onednn")
    assert engine.program.executor == "cpu-loop"
    if engine.program.policy is not None:  # the policy network also runs in a BlockLoop
        assert engine.program.policy.executor == "cpu-loop"
    python_loop = dynexec.compile(model, backend="native", convolutions="onednn", executor="python")
    assert python_loop.program.executor == "python" and (
        python_loop.program.policy is None or python_loop.program.policy.executor == "python")
    gen = torch.Generator().manual_seed(5)
    for n in (1, 3, 8):
        x = _x(family, n, seed=60 + n)
        k = engine.num_blocks
        # alternating: every routed row changes sides from one block to the next (the C++
        # loop swaps rows to keep each block's routed rows in front)
        alternating = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 2 == 0
        for routing in (None, torch.ones(n, k, dtype=torch.bool), torch.zeros(n, k, dtype=torch.bool),
                        torch.rand(n, k, generator=gen) < 0.5, alternating):
            if routing is None and model.router != "planned":
                continue
            (a, ra), (b, rb) = (e(x, return_routing=True, routing=routing) for e in (engine, python_loop))
            assert torch.equal(ra, rb) and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="bool routing"):
        engine.program.cpu_loop.loop.forward(torch.zeros(2, 3, 8, 8), torch.ones(2, 1))


@needs_onednn
@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "blockdrop-cifar", "skipnet-imagenet-bottleneck"])
def test_batch_shards_give_the_same_results(family):
    """The C++ loop split into batch shards (each running the whole network on its rows,
    single-threaded kernels) gives exactly the unsharded loop's logits and routing: for
    more shards than rows, more shards than threads (claimed by the threads one by one),
    uneven shards, one thread, forced routings and NaN rows."""
    model = make_model(family)
    engines = {s: dynexec.compile(model, backend="native", convolutions="onednn", batch_shards=s)
               for s in (1, 2, 3, 5, "auto")}
    assert [e.program.cpu_loop.loop.shards() for e in engines.values()] == [1, 2, 3, 5, 0]
    assert "batch_shards=3" in repr(engines[3])
    auto = engines["auto"].program.cpu_loop.loop
    gen = torch.Generator().manual_seed(11)
    threads = torch.get_num_threads()
    try:
        # (70, 2) and (33, 1): the default makes 4 and 2 shards (at most 32 rows each)
        for n, nthreads in ((1, 2), (2, 2), (5, 2), (8, 2), (11, 2), (8, 3), (5, 1), (70, 2), (33, 1)):
            torch.set_num_threads(nthreads)
            x = _x(family, n, seed=70 + n)
            if n == 5:
                x[3] = float("nan")
            expected = nthreads * -(-n // (32 * nthreads))  # threads x ceil(n / (32 threads))
            assert auto.shards_for(n) == min(n, expected), (n, nthreads)
            forced = torch.rand(n, engines[1].num_blocks, generator=gen) < 0.5
            for routing in (None, forced):
                (a, ra) = engines[1](x, return_routing=True, routing=routing)
                for shards, engine in engines.items():
                    b, rb = engine(x, return_routing=True, routing=routing)
                    assert torch.equal(ra, rb), (shards, n)
                    assert torch.equal(a.isnan(), b.isnan()), (shards, n)
                    assert torch.equal(a.nan_to_num(), b.nan_to_num()), (shards, n)
                if n == 5:
                    assert a[3].isnan().all() and not a[0].isnan().any()
    finally:
        torch.set_num_threads(threads)


@needs_winograd
@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "blockdrop-cifar"])
def test_work_sharing_between_shards_gives_the_same_results(family):
    """A shard's thread that has run out of shards runs chunks of the other threads'
    Winograd convolutions (cpu::HelpDesk): logits and routing stay exactly those of one
    unsharded loop, with sharing on and off, for uneven shards (one shard's rows skip
    every block, the others take them all, so one thread is idle early and helps), more
    shards than threads, and more threads than cores."""
    model = make_model(family)
    ref = dynexec.compile(model, backend="native", convolutions="winograd", batch_shards=1)
    engines = {s: dynexec.compile(model, backend="native", convolutions="winograd", batch_shards=s)
               for s in (2, 3, 5)}
    loops = lambda e: [p.cpu_loop.loop for p in (e.program, e.program.policy) if p is not None]
    assert all(loop.work_sharing() for e in engines.values() for loop in loops(e))
    threads = torch.get_num_threads()
    try:
        for n, nthreads in ((2, 2), (7, 2), (12, 3), (9, 1)):
            torch.set_num_threads(nthreads)
            x = _x(family, n, seed=90 + n)
            uneven = torch.zeros(n, ref.num_blocks, dtype=torch.bool)
            uneven[n // 2:] = True  # the first shard's rows skip every block
            for routing in (None, uneven):
                a, ra = ref(x, return_routing=True, routing=routing)
                for shards, engine in engines.items():
                    for on in (True, False):
                        for loop in loops(engine):
                            loop.set_work_sharing(on)
                        b, rb = engine(x, return_routing=True, routing=routing)
                        assert torch.equal(ra, rb) and torch.equal(a, b), (shards, n, nthreads, on)
    finally:
        torch.set_num_threads(threads)


@needs_onednn
def test_no_convolution_falls_back_to_onednns_reference_code():
    """Every sub-batch size gets one of oneDNN's JIT kernels, never its reference code
    ("ref:..."; 50-100x slower). oneDNN's preferred weight layout can depend on the batch
    size (on AVX2: 8-, 16- or 24-channel blocks), and a primitive made for weights packed
    in another size's layout falls back to the reference code; each PackedConv packs one
    copy per layout it is asked for."""
    for family in ("skipnet-cifar-rnn", "blockdrop-cifar", "skipnet-imagenet-bottleneck"):
        engine = dynexec.compile(make_model(family), backend="native", convolutions="onednn", batch_shards=1)
        gen = torch.Generator().manual_seed(4)
        for n in (1, 2, 3, 5, 8, 13, 16, 24, 31, 40):
            x = _x(family, n, seed=n)
            engine(x)
            engine(x, routing=torch.rand(n, engine.num_blocks, generator=gen) < 0.5)
    impls = torch.ops.dynexec.onednn_plan_impls()
    assert len(impls) == torch.ops.dynexec.onednn_plan_count() > 0
    assert not [i for i in impls if i.startswith("ref")], sorted(set(impls))


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "two", None])
def test_batch_shards_must_be_auto_or_a_positive_int(bad):
    model = make_model("skipnet-cifar-rnn")
    with pytest.raises(ValueError, match="batch_shards must be 'auto' or an int >= 1"):
        dynexec.compile(model, batch_shards=bad)


@needs_onednn
def test_block_loop_rejects_negative_shards():
    loop = torch.classes.dynexec.BlockLoop()
    with pytest.raises(RuntimeError, match="expected shards >= 0"):
        loop.set_shards(-1)
    with pytest.raises(RuntimeError, match="expected n >= 0 rows"):
        loop.shards_for(-1)
    loop.set_shards(5)
    assert [loop.shards_for(n) for n in (0, 1, 3, 5, 200)] == [1, 1, 3, 5, 5]


@needs_onednn
@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "blockdrop-cifar"])
def test_warmup_creates_every_primitive_a_routed_call_needs(family):
    """After engine.warmup(B), calls with any batch <= B and any routing (the router's own or
    forced) create no new oneDNN primitive; results are unchanged by the warm-up."""
    model = make_model(family)
    engine = dynexec.compile(model, backend="native", convolutions="onednn")
    x = _x(family, 6, seed=8)
    before = engine(x)
    assert engine.warmup(6) == 18
    plans = torch.ops.dynexec.onednn_plan_count()
    gen = torch.Generator().manual_seed(2)
    for n in (1, 3, 6):
        xn = _x(family, n, seed=n)
        engine(xn)
        engine(xn, routing=torch.rand(n, engine.num_blocks, generator=gen) < 0.5)
    assert torch.ops.dynexec.onednn_plan_count() == plans
    assert torch.equal(engine(x), before)
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        engine.warmup(0)
