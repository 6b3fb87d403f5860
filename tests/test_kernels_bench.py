"""Tests for benchmarks/kernels.py: its helpers, and two short end-to-end runs in a
subprocess (the CPU ops section, and the fused-conv section's interpreter smoke test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import kernels as kb  # (the checkout's root is on pytest's pythonpath)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels.py"


# ---- helpers ------------------------------------------------------------------------------
def test_count_for():
    assert kb.count_for(0.1, 128) == 13
    assert kb.count_for(0.5, 128) == 64
    assert kb.count_for(0.0, 8) == 1          # at least one active row
    assert kb.count_for(1.0, 8) == 8
    assert kb.count_for(0.9, 8) == 7
    assert kb.count_for(0.25, 1) == 1


@pytest.mark.parametrize("quick", [False, True])
def test_fused_cases_are_resnet_block_convs(quick):
    cases = kb.fused_cases(quick=quick)
    assert len(set(cases)) == len(cases)
    for c in cases:
        assert c.role in ("first", "mid", "last")
        assert c.kernel in (1, 3) and c.stride in (1, 2)
        if c.role != "first":
            assert c.stride == 1                 # compact input, residual of the output's shape
        assert c.out_size == (c.size + 2 * ((c.kernel - 1) // 2) - c.kernel) // c.stride + 1
    cifar = [c for c in cases if c.model == "cifar"]
    imagenet = [c for c in cases if c.model == "imagenet"]
    # CIFAR: 3x3 at 16/32/64 channels and 32/16/8 px, stride 1 and 2, both block convs.
    assert {c.kernel for c in cifar} == {3}
    assert {(c.cout, c.out_size) for c in cifar} == {(16, 32), (32, 16), (64, 8)}
    assert {(c.cin, c.cout, c.size) for c in cifar if c.stride == 2} == {(16, 32, 32), (32, 64, 16)}
    assert {(c.cout, c.role) for c in cifar if c.stride == 1} == {
        (w, r) for w in (16, 32, 64) for r in ("first", "last")}
    assert {c.batch for c in cifar} == ({128} if quick else {128, 256})
    # ImageNet bottleneck: 1x1 reduce (first), 3x3 (mid), 1x1 expand (last) per stage.
    sizes = {7, 28} if quick else {56, 28, 14, 7}
    assert {c.size for c in imagenet} == sizes
    for size in sizes:
        stage = {c.role: c for c in imagenet if c.size == size}
        w = stage["mid"].cin
        assert (stage["first"].kernel, stage["first"].cin, stage["first"].cout) == (1, 4 * w, w)
        assert (stage["mid"].kernel, stage["mid"].cout) == (3, w)
        assert (stage["last"].kernel, stage["last"].cin, stage["last"].cout) == (1, w, 4 * w)
    if quick:
        assert set(cases) <= set(kb.fused_cases(quick=False))


def test_fused_smoke_cases_are_tiny_and_cover_every_role():
    cases = kb.fused_cases(smoke=True)
    assert {c.model for c in cases} == {"smoke"}
    assert {c.role for c in cases} == {"first", "mid", "last"}
    assert {c.kernel for c in cases} == {1, 3} and {c.stride for c in cases} == {1, 2}
    assert all(c.batch * c.cin * c.size * c.size <= 8 * 64 * 16 * 16 for c in cases)


def test_op_shapes_cuda_adds_batch_256_at_cifar_sizes():
    cpu = kb.op_shapes(torch.device("cpu"), quick=True)
    cuda = kb.op_shapes(torch.device("cuda"), quick=True)
    assert set(cpu) < set(cuda)
    for s in kb.CIFAR_256:
        assert (s, "nchw") in cuda and (s, "nchw") not in cpu
    full = kb.op_shapes(torch.device("cuda"), quick=False)
    assert len(full) == len(set(full)) and {(s, "nchw") for s in kb.CIFAR_256} <= set(full)


def test_select_backends():
    cpu = torch.device("cpu")
    ok = (True, "ok")
    status = {"native": ok, "triton": (False, "no interpreter"), "torch": ok}
    names, notes = kb.select_backends(None, cpu, quick=True, status=status)
    assert names == ["native", "torch"] and len(notes) == 1 and "triton" in notes[0]
    assert kb.select_backends("torch,native", cpu, True, status)[0] == ["native", "torch"]
    with pytest.raises(SystemExit, match="triton is not available"):
        kb.select_backends("triton", cpu, True, status)
    with pytest.raises(SystemExit, match="unknown backend"):
        kb.select_backends("cudnn", cpu, True, status)
    # The interpreter is only used with --quick on CPU.
    status["triton"] = ok
    assert kb.select_backends(None, cpu, quick=True, status=status)[0] == ["native", "triton", "torch"]
    assert kb.select_backends(None, cpu, quick=False, status=status)[0] == ["native", "torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_resolve_device_without_gpu():
    assert kb.resolve_device(None).type == "cpu"
    with pytest.raises(SystemExit, match="no CUDA device"):
        kb.resolve_device("cuda")


def test_tolerance_and_close():
    assert kb.tolerance(torch.float32) < kb.tolerance(torch.float32, tf32=True)
    assert kb.tolerance(torch.float16) < kb.tolerance(torch.bfloat16)
    assert kb.dtype_name(torch.float32, tf32=True) == "tf32" and kb.dtype_name(torch.bfloat16) == "bf16"
    a = torch.tensor([1.0, 100.0])
    assert kb.close(a, a + 1e-3, 1e-2)[0]
    ok, err = kb.close(a, a + torch.tensor([0.0, 5.0]), 1e-2)
    assert not ok and err == pytest.approx(5.0)
    assert not kb.close(a, torch.tensor([1.0, float("nan")]), 1e-2)[0]


@pytest.mark.parametrize("cl", [False, True])
def test_gather_and_scatter_compositions_keep_layout(cl):
    x = torch.randn(6, 3, 4, 5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    rows = torch.tensor([4, 0, 3])
    y = kb.gather_composition(x, rows)
    assert torch.equal(y, x[rows])
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    out = x.clone()
    kb.scatter_composition(out, rows, y * 2)
    want = x.clone()
    want[rows] = x[rows] * 2
    assert torch.equal(out, want)


def test_baseline_compositions_match_reference():
    from dynexec.runtime.ops import reference as ref
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(50, generator=g) < 0.4
    i, c = kb.partition_composition(mask)
    ri, rc = ref.partition(mask)
    assert torch.equal(i, ri) and int(c) == int(rc)
    x = torch.randn(8, 4, 6, 6, generator=g)
    idx = torch.randperm(8, generator=g)
    y = torch.randn(5, 4, 6, 6, generator=g)
    a, b, r = x.clone(), x.clone(), x.clone()
    kb.scatter_inplace_composition(a, y, idx, 5)
    kb.scatter_outofplace_composition(b, y, idx, 5)
    ref.scatter_residual_relu_(r, y, idx, 5)
    assert torch.equal(a, r) and torch.equal(b, r)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        z = kb.downsample_composition(t, 8)
        assert torch.equal(z, ref.downsample_b(t, 8))
        assert z.stride() == ref.downsample_b(t, 8).stride()


def test_ops_table_has_one_entry_per_op():
    assert [b.op for b in kb.OPS] == ["partition", "gather_rows", "scatter_relu_", "downsample_b",
                                      "relu_pool_", "scatter_pool_", "gate_step"]
    cpu = torch.device("cpu")
    for quick in (True, False):
        for b in kb.OPS:
            cases = b.cases(cpu, quick)
            assert cases and len(set(cases)) == len(cases), b.op


@pytest.mark.parametrize("bench", kb.OPS, ids=lambda b: b.op)
def test_ops_table_entry_checks_a_backend_against_its_compositions(bench):
    """The first quick CPU case of each entry: the torch backend's result passes the
    entry's check, a corrupted one does not, and every composition runs."""
    from dynexec.runtime.ops import get_backend
    cpu = torch.device("cpu")
    shape, layout, frac = bench.cases(cpu, True)[0]
    inp = bench.inputs(shape, layout, frac, cpu, torch.Generator().manual_seed(0))
    want = bench.expected(inp)
    ops = get_backend("torch", cpu)
    run, result = bench.dynexec(ops, inp)
    got = result()
    assert bench.same(got, want, inp)
    first = got[0] if isinstance(got, tuple) else got
    first[(0,) * first.dim()] += 1  # (in the compared tensor itself)
    assert not bench.same(got, want, inp)
    baselines = bench.baselines(inp, {"torch": ops})
    assert baselines and all(isinstance(name, str) and callable(fn) for name, fn in baselines)
    for _, fn in baselines:
        fn()
    run()  # the timed closure


# ---- end to end ---------------------------------------------------------------------------
def _run(args, env_update, tmp_path, name, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


ROW_FIELDS = {"section", "device", "op", "backend", "baseline", "baseline_us", "backend_us", "ratio",
              "ok", "timing", "active", "layout", "dtype"}


@pytest.mark.slow
def test_quick_cpu_ops_run(tmp_path):
    # The quick shapes with shortened timing (--rounds 1 --min-run-time 0.01): the code path
    # of `--quick --device cpu --threads 1`, in a few seconds.
    data, stdout = _run(["--quick", "--device", "cpu", "--threads", "1", "--rounds", "1",
                         "--min-run-time", "0.01"], {}, tmp_path, "ops", timeout=90)
    for key in ("torch", "device", "gpu", "threads", "quick", "rounds", "stat", "backends",
                "interpreter", "all_ok", "results"):
        assert key in data
    assert data["device"] == "cpu" and data["gpu"] is None and data["quick"] and data["all_ok"]
    assert data["threads"] == 1 and not data["interpreter"] and not data["fused_ran"]
    assert "triton" not in data["backends"] and "torch" in data["backends"]
    assert {r["section"] for r in data["results"]} <= {"ops", "winograd"}  # (winograd: next test)
    rows = [r for r in data["results"] if r["section"] == "ops"]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    assert {r["op"] for r in rows} == {"partition", "gather_rows", "scatter_relu_", "downsample_b",
                                       "relu_pool_", "scatter_pool_", "gate_step"}
    assert {r["backend"] for r in rows} == set(data["backends"])
    for r in rows:
        assert r["ok"] and r["device"] == "cpu" and r["timing"] == "blocked_autorange"
        assert r["baseline_us"] > 0 and r["backend_us"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_us"] / r["backend_us"])
        if r["backend"] == "native":
            assert r["native_us"] == r["backend_us"]  # field of the earlier JSON format
    # every (op, shape, layout, active) row appears once per backend
    keys = [(r["op"], r["shape"], r["layout"], r["active"]) for r in rows]
    assert all(keys.count(k) == len(data["backends"]) for k in keys)
    assert "fused indexed conv vs cuDNN" in stdout and "skipped" in stdout


@pytest.mark.slow
def test_fused_smoke_under_interpreter(tmp_path):
    pytest.importorskip("triton")
    data, stdout = _run(["--fused-smoke", "--device", "cpu", "--threads", "1"],
                        {"TRITON_INTERPRET": "1"}, tmp_path, "fused", timeout=90)
    assert data["interpreter"] and data["fused_ran"] and data["all_ok"] and data["sections"] == ["fused"]
    rows = data["results"]
    assert rows and all(r["section"] == "fused_conv" for r in rows)
    assert all(ROW_FIELDS <= set(r) for r in rows)
    want = {(c.role, c.kernel, c.stride, c.cin, c.cout) for c in kb.fused_cases(smoke=True)}
    assert {(r["role"], r["kernel"], r["stride"], r["cin"], r["cout"]) for r in rows} == want
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert {r["active"] for r in rows} == set(kb.FUSED_FRACTIONS)
    for r in rows:
        assert r["ok"] and r["backend"] == "triton" and r["timing"] == "interpreter"
        assert r["max_err"] is not None and r["max_err"] <= r["tol"] * 10
        assert r["count"] == kb.count_for(r["active"], r["batch"])
        assert r["baseline_us"] > 0 and r["backend_us"] > 0
    assert kb.INTERPRETER_NOTE in stdout


def test_quick_cpu_winograd_run(tmp_path):
    from dynexec.runtime.program import winograd_available
    if not winograd_available():
        pytest.skip("no Winograd kernel here (needs dynexec._C with oneDNN and AVX2 + FMA)")
    data, stdout = _run(["--quick", "--device", "cpu", "--threads", "1", "--rounds", "1",
                         "--min-run-time", "0.01", "--sections", "winograd"], {}, tmp_path, "winograd",
                        timeout=90)
    assert data["all_ok"] and data["sections"] == ["winograd"]
    rows = data["results"]
    assert {(r["channels"], r["size"], r["batch"]) for r in rows} == set(kb.winograd_cases(quick=True))
    for r in rows:
        assert ROW_FIELDS <= set(r) and r["ok"] and r["max_err"] <= 1e-4
        assert r["baseline"] == "onednn" and r["backend"] == "winograd"
        assert r["ratio"] == pytest.approx(r["baseline_us"] / r["backend_us"])
    assert "Winograd F(2x2, 3x3) vs oneDNN" in stdout
