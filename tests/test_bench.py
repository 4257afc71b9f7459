"""Smoke tests of the benchmark: it runs and its JSON has the documented shape.

No timing assertions: speed is measured by the benchmark, not tested.
"""
import json
import math

import pytest
import torch

from simplex_param.cli import bench, timing


KEPT = "freed memory kept (stub)"


@pytest.fixture(autouse=True)
def _malloc_untouched(monkeypatch):
    """bench.main sets glibc's malloc for the whole process: not in the test
    process (test_keep_freed_memory does it in a process of its own)."""
    monkeypatch.setattr(timing, "keep_freed_memory", lambda: KEPT)


def _check_report(report, cases, contenders, overhead=False):
    assert set(report) == {"machine", "repeats", "results"} | ({"overhead"} if overhead else set())
    assert {"cpu", "cpu_count", "torch", "torch_threads", "extension_loaded"} <= set(report["machine"])
    assert report["machine"]["malloc"] == KEPT
    rows = report["results"]
    assert [(r["case"], r["dtype"], r["mode"]) for r in rows] == [
        (c, "float32", m) for c in cases for m in ("fwd", "fwd+bwd")
    ]
    for r in rows:
        assert r["floor_s"] > 0 and r["moved_bytes"] > 0
        assert list(r["contenders"]) == list(contenders)
        for name, entry in r["contenders"].items():
            assert entry["time_s"] > 0
            assert entry["ratio"] == pytest.approx(entry["time_s"] / r["floor_s"])
            assert ("compile_s" in entry) == (name == "compile")
            assert entry["page_faults"] >= 0
        # Measured, so at least the output (and the gradients) must show up.
        size = r["numel"] * 4
        extra = r["K"] * size if r["mode"] == "fwd+bwd" else 0
        assert r["contenders"]["fused"]["peak_bytes"] >= size + extra


def test_samples_rotate_and_count_page_faults():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timing.median_times(steps, 3, torch.device("cpu"), 0.0)
    rounds = order[-9:]  # after the warm-up; one call a sample at target 0
    assert [rounds[i] for i in (0, 3, 6)] == ["a", "b", "c"]  # each goes first once
    assert sorted(rounds) == sorted("abc" * 3)

    # Over two cycles, each step comes right after each other step in a
    # round: none always follows the same one (the floor's copy, say).
    order.clear()
    timing.median_times(steps, 6, torch.device("cpu"), 0.0)
    rounds = ["".join(order[-18:][i:i + 3]) for i in range(0, 18, 3)]
    followed = {(r[j], r[j + 1]) for r in rounds for j in range(2)}
    assert followed == {(a, b) for a in "abc" for b in "abc" if a != b}, rounds

    resource = pytest.importorskip("resource")
    import mmap

    def touch_fresh_pages():  # 64 pages, never touched before
        m = mmap.mmap(-1, 64 * mmap.PAGESIZE)
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1
        m.close()

    faults = {}
    timing.median_times({"fresh": touch_fresh_pages, "none": lambda: None}, 3, torch.device("cpu"), 0.001, faults)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt > 0
    assert faults["fresh"] >= 60 and faults["none"] < 1


def test_keep_freed_memory():
    """In a process of its own: glibc accepts both settings, and a training
    step's freed gradients are then reused, page for page: the eager recipe's
    fwd+bwd over 8 inputs of 4 MiB took 500-7,000 page faults per step with
    glibc's defaults (the heap's state decides), and none in most steps
    with these."""
    import platform
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt")
    script = """if True:
        import resource, statistics, torch
        from simplex_param.cli import timing
        print(timing.keep_freed_memory())
        logits = torch.randn(8, requires_grad=True)
        xs = [torch.randn(2**20, requires_grad=True) for _ in range(8)]
        grad = torch.randn(2**20)
        faults = []
        for step in range(30):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w = logits.softmax(0)
            torch.autograd.grad(sum(w[k] * xs[k] for k in range(8)), [logits, *xs], grad)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(statistics.median(faults[10:]))
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kept, median_faults = proc.stdout.splitlines()
    assert kept.startswith("freed memory kept")
    assert float(median_faults) == 0


def test_bench_malloc_default_is_not_touched(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "keep_freed_memory", lambda: pytest.fail("--malloc default set the allocator"))
    out = tmp_path / "bench.json"
    argv = ["--quick", "--repeats", "1", "--cases", "multimodal", "--json", str(out), "--contenders", "fused",
            "--malloc", "default"]
    assert bench.main(argv) == 0
    assert json.loads(out.read_text())["machine"]["malloc"] == "default"


def test_bench_quick_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    contenders = ["fused", "eager", "stack+tensordot", "reference"]
    argv = ["--quick", "--repeats", "1", "--cases", "multimodal", "--json", str(out), "--contenders", *contenders]
    assert bench.main(argv) == 0
    _check_report(json.loads(out.read_text()), ["multimodal"], contenders)
    printed = capsys.readouterr().out
    assert "multimodal" in printed and "peak extra memory" in printed


@pytest.mark.slow
def test_bench_quick_with_compile(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--cases", "multimodal", "--json", str(out)]) == 0
    _check_report(json.loads(out.read_text()), ["multimodal"], bench.CONTENDERS)


def test_bench_overhead_case(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--repeats", "1", "--cases", "overhead", "--json", str(out), "--contenders", "fused", "eager"]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    _check_report(report, [], ["fused", "eager"], overhead=True)
    rows = report["overhead"]
    assert [(r["K"], r["numel"], r["mode"]) for r in rows] == [
        (K, n, m) for K, n in bench.OVERHEAD_SIZES for m in ("fwd no_grad", "fwd", "fwd+bwd")
    ]
    for r in rows:
        assert r["contenders"]["eager"]["ratio_to_eager"] == 1.0
        assert r["contenders"]["fused"]["time_s"] > 0
    assert "forward building the graph / under no_grad" in capsys.readouterr().out


def test_bench_search_cell(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--repeats", "1", "--cases", "search-cell", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "repeats", "results", "search-cell"} and report["results"] == []
    modes = report["search-cell"]["modes"]
    assert set(modes) == {"soft", "hard"}
    assert all(m["time_s"] > 0 and m["peak_inputs"] > 0 for m in modes.values())
    assert "hard / soft" in capsys.readouterr().out


def test_per_row_contenders_agree():
    # The per-token case's eager and stack contenders compute the same op.
    import torch

    logits = torch.randn(3, 4, 5)
    xs = [torch.randn(3, 4, 6) for _ in range(5)]
    want = bench._contender("fused")(logits, xs)
    torch.testing.assert_close(bench._eager(logits, xs), want)
    torch.testing.assert_close(bench._stack_tensordot(logits, xs), want)


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--cases", "no-such-case"])


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench.main(["--quick", "--plot", str(tmp_path / "b.png")])


def test_grouped_sets_and_one_grouped_run():
    from simplex_param.cli import bench_grouped

    shapes = bench_grouped.resnet18_shapes()
    assert len(shapes) == 62
    assert 11.6e6 < sum(math.prod(s) for s in shapes) < 11.8e6  # ResNet-18: 11.69M parameters
    small = bench_grouped.many_small_shapes()
    assert len(small) == 500 and all(1 <= s[0] <= 2**16 for s in small)
    r = bench_grouped.run_grouped("grouped-many-small", torch.float32, "fwd+bwd", ("grouped", "loop", "foreach"),
                                  repeats=1, device=torch.device("cpu"), target_s=0.001)
    assert r["G"] == 500 and r["K"] == 8 and set(r["contenders"]) == {"grouped", "loop", "foreach"}
    assert r["moved_bytes"] == 2 * 9 * r["numel"] * 4
    for entry in r["contenders"].values():
        assert entry["time_s"] > 0 and entry["peak_mixed"] > 0


def test_mhc_contenders_agree():
    """ours and the eager reference compute the same values on each mHC case."""
    from simplex_param.cli import bench_mhc

    for name in bench_mhc.MHC_SETS:
        fns, args, _, _, _ = bench_mhc._make(name, torch.float32, torch.device("cpu"), False,
                                             torch.Generator().manual_seed(0), dict(tokens=8, C=16))
        ours, eager = fns["ours"](*args), fns["eager"](*args)
        for a, b in zip(ours if isinstance(ours, tuple) else [ours], eager if isinstance(eager, tuple) else [eager]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sinkhorn", "mhc-pre", "mhc-post"])
def test_one_mhc_run(name):
    from simplex_param.cli import bench_mhc

    assert bench_mhc.SIZES["sinkhorn"] == dict(tokens=32768)
    assert bench_mhc.SIZES["mhc-pre"] == bench_mhc.SIZES["mhc-post"] == dict(tokens=4096, C=2048)
    lines = []
    r = bench_mhc.run_mhc(name, torch.bfloat16, "fwd+bwd", ("ours", "eager"), repeats=1,
                          device=torch.device("cpu"), target_s=0.001, log=lines.append, sizes=dict(tokens=32, C=64))
    assert r["case"] == name and r["n"] == 4 and r["tokens"] == 32 and set(r["contenders"]) == {"ours", "eager"}
    for entry in r["contenders"].values():
        assert entry["time_s"] > 0 and entry["ratio"] > 0
    assert len(lines) == 1 and lines[0].startswith(name)


def test_bench_mhc_case_from_the_command_line(monkeypatch, capsys):
    from simplex_param.cli import bench_mhc

    monkeypatch.setitem(bench_mhc.SIZES, "sinkhorn", dict(tokens=64))
    assert bench.main(["--cases", "sinkhorn", "--repeats", "1", "--mhc-contenders", "ours", "eager"]) == 0
    out = capsys.readouterr().out
    assert "mHC case" in out and out.count("\nsinkhorn ") == 4  # 2 dtypes x 2 modes
