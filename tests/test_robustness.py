"""Robustness of ``engine(x)`` / ``model(x)`` (README, "Robustness"): bad inputs fail with a
clear error, edge-case inputs work, NaN/Inf behave as documented and identically in the
engine and the eager reference, concurrent calls give the single-threaded results, and
repeated calls neither keep state nor grow memory."""
from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest
import torch

import dynexec
from dynexec.runtime.ops import backend_status

from conftest import input_size, make_model, rel_err

BACKENDS = [name for name in ("native", "torch") if backend_status("cpu")[name][0]]


def _x(family, n, seed=0, dtype=torch.float32):
    s = input_size(family)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _runners(model):
    engine = dynexec.compile(model)
    return {"engine": engine, "model": model,
            "forward_routing": model.forward_routing}


# ------------------------------------------------------------------ bad inputs
BAD_INPUT_FAMILIES = ["skipnet-cifar-rnn", "blockdrop-cifar", "resnet-imagenet"]


def _bad_inputs(size):
    s = size
    return [
        # (label, input, exception, regex naming expected vs given)
        ("rank3", torch.randn(3, s, s), ValueError, rf"4-D input \[N, 3, {s}, {s}\].*\(3, {s}, {s}\)"),
        ("rank5", torch.randn(1, 1, 3, s, s), ValueError, r"4-D input.*\(1, 1, 3"),
        ("rank2", torch.randn(2, 3), ValueError, r"4-D input.*\(2, 3\)"),
        ("channels1", torch.randn(2, 1, s, s), ValueError, r"expected 3 input channels, got 1"),
        ("channels4", torch.randn(2, 4, s, s), ValueError, r"expected 3 input channels, got 4"),
        ("spatial", torch.randn(2, 3, s + 1, s + 1), ValueError,
         rf"spatial size {s}x{s}.*got {s + 1}x{s + 1}"),
        ("non_square", torch.randn(2, 3, s, s // 2), ValueError, rf"spatial size {s}x{s}.*got {s}x{s // 2}"),
        ("int64", torch.zeros(2, 3, s, s, dtype=torch.int64), TypeError,
         r"floating-point input of dtype torch.float32.*got dtype torch.int64"),
        ("uint8", torch.zeros(2, 3, s, s, dtype=torch.uint8), TypeError, r"torch.float32.*torch.uint8"),
        ("bool", torch.zeros(2, 3, s, s, dtype=torch.bool), TypeError, r"torch.float32.*torch.bool"),
        ("float64", torch.zeros(2, 3, s, s, dtype=torch.float64), TypeError,
         r"expected input dtype torch.float32.*got torch.float64"),
        ("float16", torch.zeros(2, 3, s, s, dtype=torch.float16), TypeError,
         r"expected input dtype torch.float32.*got torch.float16"),
        ("meta", torch.zeros(2, 3, s, s, device="meta"), ValueError,
         r"expected input on device cpu.*got meta"),
        ("ndarray", torch.zeros(2, 3, s, s).numpy(), TypeError, r"torch.Tensor.*ndarray"),
        ("list", [[0.0]], TypeError, r"torch.Tensor.*list"),
        ("none", None, TypeError, r"torch.Tensor.*NoneType"),
    ]


@pytest.mark.parametrize("family", BAD_INPUT_FAMILIES)
def test_bad_inputs_raise_clear_errors(family):
    model = make_model(family, fraction=None)
    runners = _runners(model)
    for label, x, exc, pattern in _bad_inputs(input_size(family)):
        for name, run in runners.items():
            with pytest.raises(exc, match=pattern):
                run(x)
            # the message names the model
            with pytest.raises(exc, match=model.model_name):
                run(x)


def test_float64_model_rejects_float32_input():
    model = make_model("skipnet-cifar-ffgate1", fraction=None, dtype=torch.float64)
    for run in _runners(model).values():
        with pytest.raises(TypeError, match=r"expected input dtype torch.float64.*got torch.float32"):
            run(_x("skipnet-cifar-ffgate1", 2))


def test_bad_routing_argument():
    model = make_model("blockdrop-cifar", fraction=None)
    engine = dynexec.compile(model)
    x = _x("blockdrop-cifar", 2)
    k = model.num_blocks
    with pytest.raises(TypeError, match="bool"):
        engine(x, routing=[[True] * k] * 2)
    with pytest.raises(TypeError, match="bool"):
        engine(x, routing=torch.ones(2, k, dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"shape \[2, {k}\].*\(2, {k + 1}\)"):
        engine(x, routing=torch.ones(2, k + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"shape \[2, {k}\].*\(2,\)"):
        engine(x, routing=torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------ edge-case inputs
def test_empty_batch_every_family(family):
    model = make_model(family, fraction=None)
    engine = dynexec.compile(model)
    x = _x(family, 0)
    for logits, routing in (engine(x, return_routing=True), model.forward_routing(x)):
        assert logits.shape == (0, model.num_classes) and logits.dtype == torch.float32
        assert routing.shape == (0, model.num_blocks) and routing.dtype == torch.bool
    assert engine(x).shape == (0, model.num_classes)
    assert model(x).shape == (0, model.num_classes)
    forced = torch.zeros(0, model.num_blocks, dtype=torch.bool)
    assert engine(x, routing=forced).shape == (0, model.num_classes)


@pytest.mark.parametrize("family", ["blockdrop-cifar", "skipnet-cifar-ffgate2", "resnet-cifar"])
def test_batch1_noncontiguous_and_channels_last(family):
    model = make_model(family)
    engine = dynexec.compile(model)
    base = _x(family, 5, seed=3)
    ref_logits, ref_routing = model.forward_routing(base)
    variants = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "non_contiguous": base.transpose(2, 3).contiguous().transpose(2, 3),
        "every_other_sample": torch.stack([base, torch.zeros_like(base)], dim=1).flatten(0, 1)[::2],
        "expanded_channels": base[:, :1].expand(5, 3, *base.shape[2:]),
    }
    for label, x in variants.items():
        want_l, want_r = (ref_logits, ref_routing) if label != "expanded_channels" \
            else model.forward_routing(x.contiguous())
        before = x.clone()
        logits, routing = engine(x, return_routing=True)
        assert torch.equal(x, before), label
        assert torch.equal(routing, want_r), label
        assert rel_err(logits, want_l) <= 1e-5, label
    for i in (0, 4):  # batch of one equals the same sample in a batch
        logits, routing = engine(base[i:i + 1], return_routing=True)
        assert torch.equal(routing, ref_routing[i:i + 1])
        assert rel_err(logits, ref_logits[i:i + 1]) <= 1e-5


# ------------------------------------------------------------------ NaN / Inf
def _poisoned(family, n):
    """A clean batch and a copy with: sample 0 all NaN, sample 2 one NaN and one +Inf
    pixel, sample 3 all -Inf (when n > 3); samples 1 (and 4+) clean."""
    clean = _x(family, n, seed=11)
    x = clean.clone()
    x[0] = float("nan")
    x[2, 1, 5, 7] = float("nan")
    x[2, 0, 3, 3] = float("inf")
    if n > 3:
        x[3] = -float("inf")
    return clean, x, [0, 2] + ([3] if n > 3 else [])


def _documented_routing(model, n):
    """Routing of a sample whose activations are NaN: NaN probabilities compare False, so
    SkipNet runs only block 0 (always executed), BlockDrop drops every block, and a plain
    ResNet runs every block."""
    k = model.num_blocks
    if model.router == "online":
        r = torch.zeros(n, k, dtype=torch.bool)
        r[:, 0] = True
        return r
    if model.router == "planned":
        return torch.zeros(n, k, dtype=torch.bool)
    return torch.ones(n, k, dtype=torch.bool)


def test_nan_inf_inputs_engine_matches_eager(family):
    model = make_model(family)
    engine = dynexec.compile(model)
    n = 3 if family in ("skipnet-imagenet-bottleneck", "blockdrop-imagenet") else \
        (4 if input_size(family) == 224 else 6)
    clean, x, bad = _poisoned(family, n)
    good = [i for i in range(n) if i not in bad]
    clean_eager = model.forward_routing(clean)
    clean_engine = engine(clean, return_routing=True)
    eager_logits, eager_routing = model.forward_routing(x)
    logits, routing = engine(x, return_routing=True)

    # engine == eager on routing and on which logits are NaN / finite
    assert torch.equal(routing, eager_routing)
    assert torch.equal(torch.isnan(logits), torch.isnan(eager_logits))
    assert torch.equal(torch.isfinite(logits), torch.isfinite(eager_logits))
    # documented: an all-NaN sample gives all-NaN logits and the NaN routing. (A single
    # NaN pixel need not reach the logits: e.g. a dropped block's strided 1x1 projection
    # shortcut only reads every other pixel.)
    assert torch.isnan(eager_logits[0]).all()
    assert torch.equal(eager_routing[:1], _documented_routing(model, 1))
    # the clean samples are unaffected (eval-mode BatchNorm is per sample)
    for (l_clean, r_clean), lg, r, tol in ((clean_eager, eager_logits, eager_routing, 1e-6),
                                           (clean_engine, logits, routing, 1e-5)):
        assert torch.equal(r[good], r_clean[good])
        assert torch.isfinite(lg[good]).all()
        assert rel_err(lg[good], l_clean[good]) <= tol
    assert rel_err(logits[good], eager_logits[good]) <= 1e-5


def test_all_nan_batch_and_forced_routing():
    model = make_model("blockdrop-cifar")
    engine = dynexec.compile(model)
    x = torch.full((3, 3, 32, 32), float("nan"))
    logits, routing = engine(x, return_routing=True)
    assert torch.isnan(logits).all() and not routing.any()
    forced = torch.ones(3, model.num_blocks, dtype=torch.bool)
    logits, used = engine(x, routing=forced, return_routing=True)
    assert torch.isnan(logits).all() and torch.equal(used, forced)


# ------------------------------------------------------------------ state and threads
def _snapshot(engine, model):
    return {
        "engine_dict": dict(vars(engine)),
        "model_dict": {k: v for k, v in vars(model).items()},
        "tensors": {k: (v.clone(), v._version) for k, v in model.state_dict(keep_vars=True).items()},
        "program_dict": dict(vars(engine.program)) if hasattr(engine.program, "__dict__") else None,
        "training": model.training,
    }


def _assert_unchanged(before, engine, model):
    after = _snapshot(engine, model)
    for key in ("engine_dict", "model_dict", "program_dict"):
        a, b = before[key], after[key]
        if a is None:
            continue
        assert a.keys() == b.keys(), f"{key}: attributes added/removed: {set(a) ^ set(b)}"
        for k in a:  # the same objects (no per-call rebinding)
            assert a[k] is b[k] or (isinstance(a[k], (int, float, str, bool)) and a[k] == b[k]), \
                f"{key}.{k} was rebound"
    for k, (t, version) in before["tensors"].items():
        now = after["tensors"][k]
        assert now[1] == version, f"{k} was modified in place"
        assert torch.equal(now[0], t), k
    assert after["training"] == before["training"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["skipnet-cifar-rnn", "blockdrop-cifar"])
def test_concurrent_calls_match_single_threaded(family, backend):
    model = make_model(family)
    engine = dynexec.compile(model, backend=backend)
    threads, calls = 8, 6
    jobs = {(t, c): _x(family, 1 + (t * 3 + c * 5) % 9, seed=100 * t + c)
            for t in range(threads) for c in range(calls)}
    expected = {key: engine(x, return_routing=True) for key, x in jobs.items()}
    before = _snapshot(engine, model)
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(t):
        try:
            barrier.wait()
            for rep in range(2):
                for c in range(calls):
                    results[(t, c, rep)] = engine(jobs[(t, c)], return_routing=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)
    assert not errors, errors
    assert len(results) == threads * calls * 2
    for (t, c, _), (logits, routing) in results.items():
        want_l, want_r = expected[(t, c)]
        assert torch.equal(routing, want_r), (t, c)
        assert torch.equal(logits, want_l), (t, c)
    _assert_unchanged(before, engine, model)


def test_calls_keep_no_state(family):
    model = make_model(family)
    engine = dynexec.compile(model)
    before = _snapshot(engine, model)
    x = _x(family, 2, seed=5)
    engine(x)
    engine(x, return_routing=True)
    engine(x, routing=torch.ones(2, model.num_blocks, dtype=torch.bool))
    model(x)
    _assert_unchanged(before, engine, model)


# ------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_repeated_calls_do_not_grow_memory():
    model = make_model("skipnet-cifar-rnn")
    engine = dynexec.compile(model)
    inputs = [_x("skipnet-cifar-rnn", n, seed=n) for n in range(1, 9)]
    for i in range(100):  # warm-up: allocator caches, oneDNN primitives per batch size
        engine(inputs[i % 8], return_routing=True)
    gc.collect()
    start = _rss_bytes()
    peak = start
    for i in range(1000):
        engine(inputs[(i * 5) % 8], return_routing=True)
        if i % 100 == 99:
            peak = max(peak, _rss_bytes())
    gc.collect()
    growth = _rss_bytes() - start
    assert growth < 16 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 calls"
    assert peak - start < 32 << 20, f"RSS peak {(peak - start) / 2**20:.1f} MiB above start"


def test_engine_is_released():
    model = make_model("blockdrop-cifar")
    engine = dynexec.compile(model)
    engine(_x("blockdrop-cifar", 3))
    ref_engine, ref_model, ref_program = weakref.ref(engine), weakref.ref(model), weakref.ref(engine.program)
    del engine, model
    gc.collect()
    assert ref_engine() is None, "the engine is still referenced after del"
    assert ref_program() is None, "the engine's program outlives the engine"
    assert ref_model() is None, "the model outlives model and engine"
