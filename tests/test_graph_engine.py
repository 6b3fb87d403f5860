"""Tests for the gpu-graph executor (backend triton-graph, dynexec.runtime.executors.gpu_graph) on CPU.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1 for the test process). On CPU the executor never
captures: the same sync-free launch sequence runs without the CUDA graph
(which needs a CUDA device).

Checked: routing identical to and logits within 1e-4 (relative, fp32) of the eager
official model for SkipNet (recurrent and feed-forward gates, basic and bottleneck
blocks, projection shortcuts) and BlockDrop (DownsampleB) with per-sample mixed,
all-on and all-off routings; no host sync in the forward; the same launch sequence for
different routings.

Routing set-up: ``dynexec.tools.calibrate.calibrate`` shifts the router bias by one common
offset; on these random-weight models that gives routings that are uniform across the
samples of a batch (every sample runs the same blocks), which would never exercise the
gather/scatter of a partially routed block. ``_split_routers`` therefore sets the
router biases so that each gated block's threshold falls midway between two samples'
logits (half the batch runs it). ``calibrate(model, x, 1.0 / 0.0)`` gives the all-on /
all-off routings.
"""
import contextlib
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import dynexec  # noqa: E402
from dynexec.kernels import indexed_conv as ic  # noqa: E402
from dynexec.kernels import regroup as rg  # noqa: E402
from dynexec.models.blockdrop import BlockDrop  # noqa: E402
from dynexec.models.skipnet import Bottleneck, SkipNet  # noqa: E402
from dynexec.runtime.executors import gpu_graph as ge  # noqa: E402
from dynexec.tools.calibrate import calibrate, randomize_batchnorm  # noqa: E402

# These tests run the executor on CPU tensors, which the Triton kernels take only under the
# interpreter (conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device).
pytestmark = pytest.mark.skipif(not (ic.INTERPRET and rg.kernels_interpreted()),
                                reason="CPU tests of the gpu-graph executor need the Triton interpreter")

N = 8
TOL = 1e-4


# --------------------------------------------------------------------------------------
# models and routings
# --------------------------------------------------------------------------------------
def _input(n=N, seed=2):
    # Per-sample offsets make the samples' gate / policy logits differ enough to split.
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return x + torch.linspace(-2.0, 2.0, n).view(n, 1, 1, 1)


def _build(kind):
    torch.manual_seed(0)
    if kind == "skipnet-rnn":
        model = dynexec.build("cifar10_rnn_gate_38", layers=[1, 2, 1])
    elif kind == "skipnet-ffgate1":
        model = dynexec.build("cifar10_feedforward_38", layers=[1, 2, 1])
    elif kind == "skipnet-rnn-bottleneck":
        # CIFAR-sized bottleneck SkipNet: 1x1-3x3-1x1 branches, projection shortcuts
        # (stride 1 and 2) and identity blocks, at 32 px (224 px is too slow here).
        model = SkipNet(Bottleneck, [1, 2, 1], 10, dataset="cifar", gate_type="rnn")
    elif kind == "blockdrop":
        model = dynexec.build("R32_C10", layers=[1, 2, 1])
    else:
        raise ValueError(kind)
    model.eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model


def _mid(values):
    """Midpoint between the two middle values (a threshold no sample sits on)."""
    v = values.flatten().sort().values
    k = v.numel() // 2
    return 0.5 * (v[k - 1] + v[k])


@torch.no_grad()
def _split_routers(model, x):
    """Set the router biases so that gated blocks split the batch (see module docstring)."""
    if isinstance(model, BlockDrop):
        logits = []
        hook = model.agent.logit.register_forward_hook(lambda m, i, o: logits.append(o))
        model.policy_probs(x)
        hook.remove()
        z = logits[0]
        for t in range(z.shape[1]):
            model.agent.logit.bias[t] -= _mid(z[:, t])
    elif model.gate_type == "rnn":  # one shared projection: threshold amid all steps' values
        zs = []
        hook = model.control.proj.register_forward_hook(lambda m, i, o: zs.append(o.flatten()))
        model.forward_routing(x)
        hook.remove()
        model.control.proj.bias -= _mid(torch.stack(zs))
    else:  # feed-forward gates, one after the other (each sees the earlier decisions)
        for gate in model.gates()[:-1]:
            out = []
            hook = gate.linear_layer.register_forward_hook(lambda m, i, o: out.append(o))
            model.forward_routing(x)
            hook.remove()
            d = out[0][:, 1] - out[0][:, 0]  # p(execute) > 0.5 iff d > 0
            gate.linear_layer.bias[1] -= _mid(d)
    return model


_CACHE = {}


def _model(kind, routing):
    """routing: 'mixed' | 'on' | 'off'. Returns a fresh copy."""
    key = (kind, routing)
    if key not in _CACHE:
        model = _build(kind)
        x = _input()
        if routing == "mixed":
            _split_routers(model, x)
        else:
            calibrate(model, x, 1.0 if routing == "on" else 0.0)
        _CACHE[key] = model
    return copy.deepcopy(_CACHE[key])


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _graph_engine(model):
    engine = dynexec.compile(model, backend="triton-graph")
    assert engine.program.executor == "gpu-graph" and not engine.executor.capture  # CPU: eager
    return engine


def _check_against_reference(model, x, engine=None):
    engine = engine or _graph_engine(model)
    ref_logits, ref_routing = model.forward_routing(x)
    logits, routing = engine(x, return_routing=True)
    assert routing.dtype == torch.bool and routing.shape == ref_routing.shape
    assert torch.equal(routing, ref_routing), (routing.int(), ref_routing.int())
    assert logits.shape == ref_logits.shape and logits.dtype == ref_logits.dtype
    err = _rel_err(logits, ref_logits)
    assert err < TOL, f"relative error {err:.3g}"
    return routing


KINDS = ["skipnet-rnn", "skipnet-ffgate1", "skipnet-rnn-bottleneck", "blockdrop"]


# --------------------------------------------------------------------------------------
# whole engine vs the eager official model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_routing_matches_reference(kind):
    model = _model(kind, "mixed")
    routing = _check_against_reference(model, _input())
    partial = [k for k in range(routing.shape[1]) if 0 < int(routing[:, k].sum()) < N]
    assert partial, f"no block has a per-sample mixed routing: {routing.int().T.tolist()}"
    if isinstance(model, SkipNet):
        assert routing[:, 0].all(), "SkipNet block 0 always runs"


@pytest.mark.parametrize("kind", ["skipnet-rnn", "blockdrop"])
@pytest.mark.parametrize("routing", ["on", "off"])
def test_all_on_and_all_off(kind, routing):
    model = _model(kind, routing)
    x = _input(6, seed=5)
    used = _check_against_reference(model, x)
    expected = torch.full_like(used, routing == "on")
    if isinstance(model, SkipNet):
        expected[:, 0] = True
    assert torch.equal(used, expected)


def test_forced_routing_and_layouts():
    """routing= overrides the router (BlockDrop: vs forward_masked); NCHW and
    channels_last inputs give the same result; the caller's input is not modified."""
    model = _model("blockdrop", "mixed")
    engine = _graph_engine(model)
    x = _input(5, seed=7)
    forced = torch.rand(5, model.num_blocks, generator=torch.Generator().manual_seed(3)) > 0.5
    forced[:, 1] = True
    forced[:, 2] = False
    x_cl = x.contiguous(memory_format=torch.channels_last)
    before = x_cl.clone()
    logits, used = engine(x_cl, routing=forced, return_routing=True)
    assert torch.equal(used, forced) and used is not forced
    assert torch.equal(x_cl, before)
    with torch.no_grad():
        ref = model.resnet.forward_masked(x, forced)
    assert _rel_err(logits, ref) < TOL
    assert torch.equal(engine(x, routing=forced), logits)  # NCHW input, same bits


def test_errors_and_empty_batch():
    model = _model("skipnet-rnn", "mixed")
    engine = _graph_engine(model)
    assert "triton-graph" in repr(engine)
    with pytest.raises(TypeError):
        engine(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError):
        engine(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError):
        engine(torch.randn(2, 3, 32, 32), routing=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        engine(torch.randn(2, 3, 32, 32), routing=torch.ones(2, 4))
    logits, routing = engine(torch.randn(0, 3, 32, 32), return_routing=True)
    assert logits.shape == (0, 10) and routing.shape == (0, 4) and routing.dtype == torch.bool
    with pytest.raises(ValueError, match="fold_bn"):
        dynexec.compile(model, backend="triton-graph", fold_bn=False)
    with pytest.raises(ValueError, match="eval-mode"):
        dynexec.compile(copy.deepcopy(model).train(), backend="triton-graph")


def test_needs_cuda_or_interpreter():
    """Outside the interpreter, a CPU model gets the documented RuntimeError."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, dynexec
        model = dynexec.build("cifar10_rnn_gate_38", layers=[1, 1, 1]).eval()
        try:
            dynexec.compile(model, backend="triton-graph")
        except RuntimeError as e:
            assert "triton-graph needs a CUDA device (or TRITON_INTERPRET=1 for tests)" in str(e), e
            print("OK")
        else:
            raise SystemExit("no error")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------
# sync-freedom and a static launch sequence
# --------------------------------------------------------------------------------------
class _HostSync(AssertionError):
    pass


def _forbid(name):
    def raiser(*args, **kwargs):
        raise _HostSync(f"host sync: Tensor.{name} called in the triton-graph forward")
    return raiser


_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                 "numpy", "cpu")


def test_no_host_sync(monkeypatch):
    """The whole forward (stem, router, every block, head) runs with every
    device->host read of a tensor patched to raise. The Triton interpreter itself
    reads CPU tensors (it *is* the device here), so the patch is lifted inside its
    launches; the launchers' argument handling stays guarded."""
    model = _model("skipnet-rnn", "mixed")
    engine = _graph_engine(model)
    x = _input()
    ref_logits, ref_routing = model.forward_routing(x)
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}
    orig_nonzero = torch.nonzero

    def guard(on):
        for name, fn in originals.items():
            monkeypatch.setattr(torch.Tensor, name, _forbid(name) if on else fn)
        monkeypatch.setattr(torch, "nonzero", _forbid("torch.nonzero") if on else orig_nonzero)

    from triton.runtime.interpreter import InterpretedFunction
    orig_run = InterpretedFunction.run

    def unguarded_run(self, *args, **kwargs):
        guard(False)
        try:
            return orig_run(self, *args, **kwargs)
        finally:
            guard(True)

    monkeypatch.setattr(InterpretedFunction, "run", unguarded_run)
    guard(True)
    try:
        with pytest.raises(_HostSync):  # the guard is live
            bool(torch.ones(()))
        logits, routing = engine(x, return_routing=True)
    finally:
        guard(False)
    assert torch.equal(routing, ref_routing)
    assert _rel_err(logits, ref_logits) < TOL


class _AtenLog(TorchDispatchMode):
    """Records every aten op (with shapes) dispatched in its scope."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def _launches(engine, x, routing=None):
    with engine.executor.record_launches() as log, _AtenLog() as aten:
        _, used = engine(x, routing=routing, return_routing=True)
    return log, aten.ops, used


def test_same_launch_sequence_for_every_routing():
    """Different routings on one engine (router-made, and forced all-on / all-off /
    mixed) enqueue exactly the same kernel launches and aten ops."""
    model = _model("blockdrop", "mixed")
    engine = _graph_engine(model)
    x = _input(4, seed=11)
    engine(x)  # the first call per batch size builds the workspaces (extra allocations)
    log_a, aten_a, used_a = _launches(engine, x)
    log_b, aten_b, used_b = _launches(engine, torch.flip(x, dims=(0,)) * 0.5)
    ones = torch.ones_like(used_a)
    log_on, aten_on, _ = _launches(engine, x, ones)
    log_off, aten_off, _ = _launches(engine, x, ~ones)
    assert not torch.equal(used_a, used_b)
    assert len(log_a) > 0 and sum(e[0] == "conv" for e in log_a) == 2 * model.num_blocks
    assert sum(e[0] == "partition" for e in log_a) == model.num_blocks
    assert log_a == log_b and aten_a == aten_b
    assert log_on == log_off and aten_on == aten_off
    # the forced path skips only the policy network
    assert [e for e in log_a if e[0] != "policy"] == log_on


def test_skipnet_launch_sequence_and_workspace_reuse():
    """Online router: block 0 runs on the whole batch without a partition, every later
    block is partitioned after its gate; the workspaces are built once per batch size."""
    model = _model("skipnet-ffgate1", "mixed")
    engine = _graph_engine(model)
    x = _input(3, seed=13)
    engine(x)  # builds the workspaces
    log_a, aten_a, used_a = _launches(engine, x)
    log_b, aten_b, used_b = _launches(engine, -x)
    assert log_a == log_b and aten_a == aten_b
    kinds = [e[0] for e in log_a]
    assert kinds.count("full") == 1 and kinds.count("partition") == model.num_blocks - 1
    assert kinds.count("gate") == model.num_blocks - 1
    assert len(engine.executor._workspaces) == 1


# --------------------------------------------------------------------------------------
# CUDA-graph plumbing (static buffers, replay, clones) with a stand-in graph on CPU
# --------------------------------------------------------------------------------------
def test_graph_runner_plumbing_with_fake_cuda_graph(monkeypatch):
    """Real capture needs a GPU. Here torch.cuda's stream/graph API is replaced by
    stand-ins whose replay re-runs the engine's forward on the static buffers and writes
    the static outputs in place (what a replay does). This checks the runner: one
    capture per (batch size, dtype, forced or not), warm-up before capture, the input
    and forced routing copied into the static buffers, fresh clones returned."""
    model = _model("blockdrop", "mixed")
    engine = _graph_engine(model)
    executor = engine.executor
    executor.capture = True
    events = []

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            events.append("wait")

    class FakeGraph:
        def replay(self):
            events.append("replay")
            runner = self.runner
            logits, routing = executor._forward(runner.static_x, runner.static_forced)
            runner.static_logits.copy_(logits)
            runner.static_routing.copy_(routing)

    graphs = []

    @contextlib.contextmanager
    def fake_graph(g):
        events.append("capture")
        graphs.append(g)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    orig_init = ge._GraphRunner.__init__

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.graph.runner = self

    monkeypatch.setattr(ge._GraphRunner, "__init__", init)
    executor.warmup = 1

    x1, x2 = _input(4, seed=21), _input(4, seed=22)
    out1 = engine(x1, return_routing=True)
    out2 = engine(x2, return_routing=True)
    assert events == ["wait", "wait", "capture", "replay", "replay"]
    assert len(executor._graphs) == 1
    for x, (logits, routing) in ((x1, out1), (x2, out2)):
        ref_logits, ref_routing = model.forward_routing(x)
        assert torch.equal(routing, ref_routing)
        assert _rel_err(logits, ref_logits) < TOL
    runner = next(iter(executor._graphs.values()))
    assert out2[0].data_ptr() != runner.static_logits.data_ptr()  # a clone, not the buffer
    forced = ~out1[1]
    logits_f, used_f = engine(x1, routing=forced, return_routing=True)
    assert len(executor._graphs) == 2 and torch.equal(used_f, forced)
    with torch.no_grad():
        assert _rel_err(logits_f, model.resnet.forward_masked(x1, forced)) < TOL


def test_calls_from_two_threads():
    """Calls on one engine are serialised by its lock; concurrent results are right."""
    import threading

    model = _model("blockdrop", "mixed")
    engine = _graph_engine(model)
    xs = [_input(3, seed=31), _input(3, seed=32)]
    results = [None, None]

    def run(i):
        results[i] = engine(xs[i], return_routing=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, (logits, routing) in zip(xs, results):
        ref_logits, ref_routing = model.forward_routing(x)
        assert torch.equal(routing, ref_routing)
        assert _rel_err(logits, ref_logits) < TOL
