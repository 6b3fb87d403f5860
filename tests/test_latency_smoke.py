"""Smoke run of benchmarks/latency.py (the full benchmark is not a test) and the presets."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from dynexec.tools.presets import build_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = {"model", "routing_source", "device", "gpu", "batch_size", "method", "backend",
              "ms_median", "ms_p20", "ms_p80", "samples_per_s", "executed_fraction",
              "flops_dense", "flops_executed", "theoretical_speedup", "realized_speedup",
              "realization", "speedup_vs_official", "speedup_vs_best_peer", "best_peer"}


def test_latency_smoke(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--device", "cpu",
           "--models", "blockdrop110,skipnet110-allon", "--batch-sizes", "1,3", "--repeats", "2",
           "--warmup", "1", "--pool", "2", "--calibration", "8", "--threads", "1",
           "--backends", "native,torch", "--no-progress", "--data", "random", "--no-peers",
           "--json", str(out), "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    # --no-peers: the methods and table without peers
    assert result["peers_requested"] == [] and result["peers_unavailable"] == {}
    assert not any(r["method"].startswith("peer:") for r in result["rows"])
    assert all(r["speedup_vs_best_peer"] is None and r["best_peer"] == "" for r in result["rows"])
    assert "best peer" not in proc.stdout and "peer " not in proc.stderr
    assert {"torch", "device", "threads", "cpu_model", "cpu_capability"} <= set(result["machine"])
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["machine"]["winograd_isa"] in ("avx512", "avx2", "")
    rows = result["rows"]
    assert all(set(r) == ROW_FIELDS for r in rows)
    methods = {(r["model"], r["batch_size"], r["method"], r["backend"]) for r in rows}
    for model in ("blockdrop110", "skipnet110-allon"):
        for batch in (1, 3):
            for method, backend in [("official-masked", "-"), ("dense-engine", "native"),
                                    ("dynexec", "native"), ("dynexec", "torch"), ("per-sample", "native")]:
                assert (model, batch, method, backend) in methods
    # every round's times are in the JSON, and the ratios are their paired medians
    assert result["speedup_estimator"].startswith("paired")
    rounds = {(g["model"], g["batch_size"]): g["times_ms"] for g in result["rounds"]}
    assert set(rounds) == {(m, b) for m in ("blockdrop110", "skipnet110-allon") for b in (1, 3)}
    for r in rows:
        assert r["routing_source"] == "calibrated"
        times = rounds[(r["model"], r["batch_size"])]
        own = times[f"{r['method']}/{r['backend']}"]
        assert len(own) == 2 and r["ms_median"] == sum(own) / 2
        dense = times["dense-engine/native"]
        official = times["official-masked/-"]
        assert r["realized_speedup"] == pytest.approx((dense[0] / own[0] + dense[1] / own[1]) / 2, rel=1e-12)
        assert r["speedup_vs_official"] == pytest.approx(
            (official[0] / own[0] + official[1] / own[1]) / 2, rel=1e-12)
        assert r["realization"] == r["realized_speedup"] / r["theoretical_speedup"]
        if r["method"] == "dense-engine":
            assert r["realized_speedup"] == 1.0 and r["executed_fraction"] == 1.0
    allon = [r for r in rows if r["model"] == "skipnet110-allon" and r["method"] == "dynexec"]
    assert all(r["executed_fraction"] == 1.0 for r in allon)
    assert (tmp_path / "r.png").stat().st_size > 0
    assert "inputs for blockdrop110: random normal inputs" in proc.stdout


def test_gpu_flag_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--gpu", "a100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--device cpu" in proc.stderr


def test_calibrated_preset_hits_its_target():
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, source = build_preset("blockdrop110", images)
    assert source == "calibrated"
    frac = model.forward_routing(images)[1].float().mean().item()
    assert abs(frac - 16.933 / 54) < 0.05


def test_conv_bound_smoke():
    """benchmarks/conv_bound.py runs and reports one line per (model, batch), without the
    profiler backend's per-call log lines on stderr."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "conv_bound.py"), "--models",
           "blockdrop110", "--batch-sizes", "2,5", "--repeats", "1", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profiler_start" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("blockdrop110")]
    assert [int(ln[1]) for ln in lines] == [2, 5]
    for ln in lines:
        assert 0.0 < float(ln[2]) <= 1.0 and float(ln[3]) > 0 and float(ln[5]) > 0


def _latency_module():
    from benchmarks import latency  # (the checkout's root is on pytest's pythonpath)
    return latency


def test_timing_rounds_shuffle_the_method_order():
    """Every method is timed once per round on that round's batch, and no method always
    follows the same one (a fixed order would hand one method the caches another warmed)."""
    latency = _latency_module()
    Method, time_methods = latency.Method, latency.time_methods
    calls: list[tuple[str, int]] = []
    current: dict = {}
    batches = [torch.full((1,), float(i)) for i in range(3)]
    methods = [Method(name, "-", lambda name=name: calls.append((name, int(current["x"].item()))))
               for name in ("official-masked", "dense-engine", "dynexec", "per-sample")]
    times = time_methods(methods, batches, current, timer=lambda fn: fn() or 1.0, repeats=30, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {f"{m.name}/-": 30 for m in methods}
    timed = calls[2 * len(methods):]
    rounds = [timed[i:i + len(methods)] for i in range(0, len(timed), len(methods))]
    assert all(sorted(n for n, _ in r) == sorted(m.name for m in methods) for r in rounds)
    assert all({b for _, b in r} == {i % 3} for i, r in enumerate(rounds))
    predecessors = {pred for r in rounds for (pred, _), (name, _) in zip(r, r[1:]) if name == "dynexec"}
    assert len(predecessors) == len(methods) - 1
    assert len({tuple(n for n, _ in r) for r in rounds}) > 1
    # seeded: the same order on every run
    calls.clear()
    time_methods(methods, batches, current, timer=lambda fn: fn() or 1.0, repeats=30, warmup=2)
    calls2, calls[:] = list(calls), []
    time_methods(methods, batches, current, timer=lambda fn: fn() or 1.0, repeats=30, warmup=2)
    assert calls == calls2


def test_a_busy_machine_is_reported(capsys):
    latency = _latency_module()
    row = lambda method, med, p20, p80: {"method": method, "ms_median": med, "ms_p20": p20, "ms_p80": p80}
    # routed methods vary with the routing from round to round: only the dense engine counts
    quiet = [row("dense-engine", 10.0, 9.8, 10.3), row("dense-engine", 20.0, 19.5, 20.5),
             row("dense-engine", 40.0, 38.0, 44.0), row("dynexec", 5.0, 3.0, 7.0)]
    busy = [row("dense-engine", 10.0, 9.0, 11.5), row("dense-engine", 20.0, 19.0, 22.0),
            row("dense-engine", 40.0, 39.0, 40.5), row("dynexec", 5.0, 4.9, 5.1)]
    assert latency.baseline_spread(quiet) == 0.05
    assert latency.baseline_spread(busy) == 0.15
    assert latency.baseline_spread([row("dynexec", 5.0, 4.0, 6.0)]) is None
    latency.print_noise_warning(quiet)
    assert capsys.readouterr().out == ""
    latency.print_noise_warning(busy)
    out = capsys.readouterr().out
    assert "median 15% between p20 and p80" in out and "busy" in out


def test_paired_ratio_cancels_slowdowns_that_span_a_round():
    latency = _latency_module()
    gen = torch.Generator().manual_seed(0)
    # the machine's speed drifts by up to 2x from round to round; within a round the
    # routed method always takes half the dense one's time
    slowdown = (1 + torch.rand(41, generator=gen)).tolist()
    dense = [100.0 * s for s in slowdown]
    routed = [50.0 * s for s in slowdown]
    assert latency.paired_ratio(dense, routed) == pytest.approx(2.0, rel=1e-12)
    # a median: one disturbed round does not move it
    routed[7] *= 3
    assert latency.paired_ratio(dense, routed) == pytest.approx(2.0, rel=1e-12)
    assert latency.paired_ratio([3.0, 5.0], [1.0, 1.0]) == 4.0
    with pytest.raises(ValueError, match="equally long"):
        latency.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        latency.paired_ratio([], [])


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_latency_peers_smoke(tmp_path):
    """Dense peers are methods timed in the same rounds; dynexec rows get the paired speedup
    over the fastest peer; a peer that cannot run is reported, not dropped silently."""
    out = tmp_path / "p.json"
    wanted = ["torch-eager", "onnxruntime", "openvino", "no-such-runtime"]
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--device", "cpu",
           "--models", "blockdrop110", "--batch-sizes", "2", "--repeats", "2", "--warmup", "1",
           "--pool", "2", "--calibration", "8", "--threads", "1", "--backends", "native",
           "--no-progress", "--data", "random", "--peers", ",".join(wanted),
           "--json", str(out), "--csv", str(tmp_path / "p.csv"), "--plot", str(tmp_path / "p.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["peers_requested"] == wanted
    unavailable = result["peers_unavailable"]
    # the unknown peer, and any runtime not installed here, are reported on stderr and in the JSON
    expected_missing = {"no-such-runtime"} | {n for n in ("onnxruntime", "openvino") if not _installed(n)}
    assert set(unavailable) == expected_missing, unavailable
    assert "unknown peer" in unavailable["no-such-runtime"]
    for name, reason in unavailable.items():
        assert f"peer {name} unavailable: {reason}" in proc.stderr
    rows = result["rows"]
    assert all(set(r) == ROW_FIELDS for r in rows)
    timed = [n for n in wanted if n not in unavailable]
    peer_rows = {r["method"]: r for r in rows if r["method"].startswith("peer:")}
    assert set(peer_rows) == {f"peer:{n}" for n in timed}
    assert peer_rows["peer:torch-eager"]["backend"] == torch.__version__
    times = result["rounds"][0]["times_ms"]
    best = min(peer_rows.values(), key=lambda r: r["ms_median"])
    best_times = times[f"{best['method']}/{best['backend']}"]
    dense = times["dense-engine/native"]
    for r in rows:
        own = times[f"{r['method']}/{r['backend']}"]
        assert r["best_peer"] == best["method"]
        assert r["speedup_vs_best_peer"] == pytest.approx(
            (best_times[0] / own[0] + best_times[1] / own[1]) / 2, rel=1e-12)
    for r in peer_rows.values():
        assert r["executed_fraction"] == 1.0 and r["theoretical_speedup"] == 1.0
        own = times[f"{r['method']}/{r['backend']}"]
        assert r["realized_speedup"] == pytest.approx((dense[0] / own[0] + dense[1] / own[1]) / 2, rel=1e-12)
    assert best["speedup_vs_best_peer"] == 1.0
    dynexec_rows = [r for r in rows if r["method"] == "dynexec"]
    assert dynexec_rows and all(r["speedup_vs_best_peer"] > 0 for r in dynexec_rows)
    # every timed peer matched the dense engine's logits
    checks = result["peer_checks"]["blockdrop110"]
    assert set(checks) == set(timed)
    assert all(e <= 1e-3 for c in checks.values() for e in c["max_rel_error"].values())
    assert "best peer" in proc.stdout and best["method"].removeprefix("peer:") in proc.stdout
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["speedup_vs_best_peer", "best_peer"]
    assert (tmp_path / "p.png").stat().st_size > 0


def _tiny_models():
    from dynexec import models
    torch.manual_seed(0)
    # one block per stage: SkipNet (projection shortcuts, gates left out) and BlockDrop
    return {"skipnet": models.build("cifar10_rnn_gate_rl_38", layers=[1, 1, 1]).eval(),
            "blockdrop": models.build("R32_C10", layers=[1, 1, 1]).eval()}


def test_dense_backbone_runs_every_block_without_the_router():
    from benchmarks import peers
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    models = _tiny_models()
    skipnet, blockdrop = models["skipnet"], models["blockdrop"]
    with torch.inference_mode():
        # SkipNet: the stem, every ResNet block (its own forward, projection shortcut
        # included), the head; BlockDrop: the masked forward with every block kept
        h = skipnet.stem(images)
        for g, i in skipnet._names():
            h = getattr(skipnet, f"group{g}_layer{i}")(h)
        expected = {"skipnet": skipnet.head(h),
                    "blockdrop": blockdrop.resnet.forward_masked(
                        images, torch.ones((3, blockdrop.num_blocks), dtype=torch.bool))}
        for kind, model in models.items():
            backbone = peers.dense_backbone(model)
            assert torch.allclose(backbone(images), expected[kind], rtol=1e-5, atol=1e-6), kind
            # the model's own weights (no copy)
            assert {id(p) for p in backbone.parameters()} <= {id(p) for p in model.parameters()}
    assert isinstance(peers.dense_backbone(blockdrop), peers.FlatResNetBackbone)
    # no router: BlockDrop's agent is not part of its backbone
    agent = {id(p) for p in blockdrop.agent.parameters()}
    assert not agent & {id(p) for p in peers.dense_backbone(blockdrop).parameters()}


def test_peers_that_cannot_run_are_reported(monkeypatch):
    """A missing runtime, an unknown name and a peer whose logits differ from the reference
    are each reported with the reason, and left out."""
    from benchmarks import peers
    model = _tiny_models()["blockdrop"]
    reference = peers.dense_backbone(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed

    def off_by_a_percent(ctx):
        version, fn = peers._torch_eager(ctx)
        return version, lambda x: fn(x) * 1.01
    monkeypatch.setitem(peers.BUILDERS, "torch-eager-cl", off_by_a_percent)
    built, unavailable = peers.build_peers(
        model, ["torch-eager", "torch-eager-cl", "openvino", "tensorflow"], [1, 3], images,
        lambda x: reference(x))
    assert set(built) == {"torch-eager"}
    assert built["torch-eager"].max_rel_error == {1: 0.0, 3: 0.0}
    assert unavailable["openvino"].startswith("ModuleNotFoundError: import of openvino halted")
    assert unavailable["tensorflow"].startswith("unknown peer")
    assert "does not match the dense reference at batch 1" in unavailable["torch-eager-cl"]


@pytest.mark.slow
def test_every_peer_matches_the_dense_model():
    """Every peer (torch.compile and the ONNX runtimes included) on SkipNet and BlockDrop
    backbones, at two batch sizes through one build (dynamic ONNX batch axis, one compiled
    graph per batch size)."""
    from benchmarks import peers
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for kind, model in _tiny_models().items():
        reference = peers.dense_backbone(model)
        built, unavailable = peers.build_peers(model, list(peers.PEERS), [1, 3], images,
                                               lambda x: reference(x))
        missing = {n for n in ("onnxruntime", "openvino") if not _installed(n)}
        assert set(unavailable) == missing, (kind, unavailable)
        assert set(built) == set(peers.PEERS) - missing
        for peer in built.values():
            assert set(peer.max_rel_error) == {1, 3} and max(peer.max_rel_error.values()) < 1e-5
            out = peers.to_tensor(peer.fn(images[1:4].contiguous()))
            assert torch.allclose(out, reference(images[1:4]), rtol=1e-4, atol=1e-5), (kind, peer.name)
