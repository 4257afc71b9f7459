"""The demo, ``python -m simplex_param demo``, on small sizes: what it prints,
that it recovers the true weights, and its command line."""
import argparse
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from simplex_param.cli import demo

SMALL = ["--steps", "120", "--batch", "64", "--features", "256"]
ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", re.M)


def parse(argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def check_report(out, K):
    """The weights table, the recovery verdict and the timings, as printed."""
    rows = [tuple(float(v) for v in m.groups()) for m in ROW.finditer(out)]
    assert [int(r[0]) for r in rows] == list(range(K))
    true = [r[1] for r in rows]
    learned = [r[2] for r in rows]
    assert abs(sum(true) - 1) < 2e-3 and abs(sum(learned) - 1) < 2e-3
    assert max(abs(a - b) for a, b in zip(learned, true)) < demo.TOLERANCE
    # The fused and hand-written models learn the same weights.
    assert all(abs(r[2] - r[3]) < 1e-3 for r in rows)
    assert re.search(r"max \|learned - true\| = [0-9.]+ \(required < 0.02\): OK", out)
    assert re.search(r"final loss: [0-9.]+ fused, [0-9.]+ hand-written \(noise floor 0.01000\)", out)
    assert re.search(rf"branch 0 missing at inference: loss [0-9.]+ .* other {K - 1} ", out)
    times = re.findall(r"^\s+(?:SimplexFusion|hand-written softmax \+ sum of w \* x)\s+([0-9.]+) ms$", out, re.M)
    assert len(times) == 2 and all(float(t) > 0 for t in times)
    assert re.search(r"SimplexFusion is [0-9.]+x the speed of the hand-written recipe \((faster|slower)\)", out)


@pytest.mark.parametrize("progress", ["plain", "tqdm"])
def test_demo_recovers_the_weights(progress, capsys, monkeypatch):
    if progress == "plain":
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    else:
        pytest.importorskip("tqdm")
    rc = demo.run(parse(SMALL + ["--inputs", "3", "--seed", "1"]))
    captured = capsys.readouterr()
    assert rc == 0, captured.out
    check_report(captured.out, K=3)
    assert "training" in captured.err  # the progress report
    if progress == "plain":
        assert "training: 120/120 steps" in captured.err


def test_demo_fails_when_the_weights_are_off(capsys):
    # One step cannot learn the weights: the demo must say so and exit with 1.
    rc = demo.run(parse(["--steps", "1", "--batch", "8", "--features", "8"]))
    out = capsys.readouterr().out
    assert rc == 1
    assert re.search(r"\(required < 0.02\): FAILED", out)


def test_demo_command_line():
    help_text = argparse.ArgumentParser()
    demo.add_arguments(help_text)
    text = help_text.format_help()
    for option in ("--steps", "--inputs", "--seed", "--device", "--batch", "--features", "--lr", "--plot"):
        assert option in text
    args = parse([])
    assert (args.steps, args.inputs, args.seed, args.device, args.plot) == (200, 4, 0, "cpu", None)
    for bad in (["--inputs", "1"], ["--steps", "0"], ["--steps", "x"]):
        with pytest.raises(SystemExit) as exc:
            parse(bad)
        assert exc.value.code == 2


def test_demo_rejects_a_bad_device(capsys):
    assert demo.run(parse(SMALL + ["--device", "nonsense"])) == 2
    assert "--device 'nonsense'" in capsys.readouterr().err


def test_python_m_simplex_param_demo():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "simplex_param", "demo", *SMALL, "--inputs", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_report(proc.stdout, K=5)


def assert_ends_with_the_summary(out, K):
    lines = out.rstrip("\n").splitlines()
    assert lines[-3] == "the learned weights (sp.summary):"
    assert lines[-2].startswith("name") and "eff. K" in lines[-2]
    row = rf"fused\.weight\s+SimplexFusion\s+softmax\s+1\s+{K}\s+[0-9.]+\s+[0-9.]+\s+{K}\.00\s+\d:"
    assert re.match(row, lines[-1])


def test_demo_ends_with_the_weights_summary(capsys):
    assert demo.main(SMALL + ["--inputs", "3"]) == 0
    out = capsys.readouterr().out
    assert_ends_with_the_summary(out, K=3)
    assert "wrote" not in out and "WeightLogger" not in out  # no --plot: no logger, no picture


def test_demo_plot_draws_the_weights_converging(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "weights.png"
    assert demo.main(SMALL + ["--inputs", "3", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 120 steps, a record every 120 // 100 = 1 step, and step 0.
    assert f"wrote {path}: the weights at 121 steps (sp.WeightLogger), the true ones dashed" in out
    check_report(out, K=3)
    assert_ends_with_the_summary(out, K=3)


def test_demo_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec now finds nothing
    assert demo.main(SMALL + ["--plot", str(tmp_path / "w.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "w.png").exists()


def test_soup_demo_learns_a_better_soup_than_the_uniform_one(capsys):
    """``python -m simplex_param soup``, at a smaller width: the learned soup
    beats the uniform one (whose two off-task members pull it down) and the
    best member; both training steps are timed and their memory measured."""
    from simplex_param.cli import soup_demo

    assert soup_demo.main(["--hidden", "256", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    acc = {name: float(v) for name, v in re.findall(r"^\s+(best member \(\d\)|uniform soup|learned soup)\s+([0-9.]+)$",
                                                   out, re.M)}
    assert len(acc) == 3
    best = next(v for k, v in acc.items() if k.startswith("best"))
    assert acc["learned soup"] > acc["uniform soup"] + 0.03
    assert acc["learned soup"] > best
    steps = re.findall(r"^\s+(LearnedSoup|model-soups recipe)\s+([0-9.]+) ms\s+peak extra memory\s+([0-9.]+) MiB "
                       r"\(([0-9.]+) models\)$", out, re.M)
    assert [s[0] for s in steps] == ["LearnedSoup", "model-soups recipe"]
    assert all(float(s[1]) > 0 and float(s[2]) > 0 for s in steps)


SOUP_SMALL = ["--hidden", "32", "--members", "3", "--noisy", "1", "--steps", "20"]
SOUP_ACCURACY = re.compile(r"^\s+(best member \(\d\)|uniform soup|learned soup)\s+([0-9.]+)$", re.M)


def _soup_command(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "simplex_param", "soup", *SOUP_SMALL, *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.multiprocess
def test_soup_demo_on_two_ranks_matches_one_process():
    """``soup --ranks 2``: the soup sharded on 2 gloo processes learns what
    one process learns (the same accuracies, within noise), and each rank
    holds about half of the members' bytes."""
    one, two = _soup_command("--ranks", "1"), _soup_command("--ranks", "2")
    acc1, acc2 = dict(SOUP_ACCURACY.findall(one)), dict(SOUP_ACCURACY.findall(two))
    assert len(acc1) == 3 and acc1.keys() == acc2.keys(), (one, two)
    for name in acc1:
        assert abs(float(acc1[name]) - float(acc2[name])) <= 0.01, (name, one, two)
    members = re.compile(r"^member test accuracies: (.*)$", re.M)
    assert members.search(one).group(1) == members.search(two).group(1)
    unsharded = int(re.search(r"against ([0-9,]+) for the unsharded soup", two).group(1).replace(",", ""))
    ranks = re.findall(r"^\s+rank (\d): ([0-9,]+) bytes", two, re.M)
    assert [r for r, _ in ranks] == ["0", "1"], two
    assert all(int(n.replace(",", "")) <= 0.55 * unsharded for _, n in ranks), two
    assert "skipped" in two and "model-soups recipe" in one


def _crash(rank, ranks):
    if rank == 1:
        raise RuntimeError("injected failure")
    torch.distributed.barrier()


def _hang(rank, ranks):
    if rank == 1:
        time.sleep(600)
    torch.distributed.barrier()


@pytest.mark.multiprocess
@pytest.mark.parametrize("fn, message", [(_crash, "rank 1 failed (exit code 1)"),
                                         (_hang, "ranks 0, 1 did not finish within 20 s")])
def test_soup_ranks_end_with_a_message_naming_the_rank(fn, message, capfd):
    from simplex_param.cli import soup_ranks

    t0 = time.monotonic()
    assert soup_ranks.launch(fn, 2, timeout=20) == 1
    assert time.monotonic() - t0 < 120
    err = capfd.readouterr().err
    assert message in err, err
