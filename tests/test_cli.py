"""The fused-tau command line (fused_tau.cli, fused_tau.demos), end to end on CPU.

Every sub-command runs in-process through ``cli.main([...])``; ``python -m fused_tau`` and the
``fused-tau`` console script run once each as subprocesses.  Printed numbers are checked
against the seed documents' digits and against ``fused_tau.reference`` in float64; the demos
run at small sizes (the contrastive one once at its defaults, which must stay fast); every PNG
must be a real, non-blank picture; bad arguments must end in one line on stderr.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_tau
from fused_tau._dispatch import PUBLIC_OPS, explain_backend
from fused_tau import cli, reference

from .test_seeds import SEED_000, SEED_002, SEED_003_A, SEED_003_B, assert_printed

from .cli_support import (  # noqa: F401  (_default_dispatch: an autouse fixture)
    _default_dispatch, run, parse_table_output, close)


# ---------------------------------------------------------------- table

def reference_row(logits, tau, target):
    """What one τ of the table must show, from fused_tau.reference in float64 with autograd.

    Where the target is the largest logit the reference's float64 loss cancels (lse - z_y: a
    loss of 1e-13 keeps one digit), so there the exact sums without cancellation are used,
    after checking that the reference agrees with them to its own rounding."""
    x = torch.tensor([logits], dtype=torch.float64, requires_grad=True)
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    p = reference.softmax(x.detach(), tau=tau)[0]
    logp = reference.log_softmax(x.detach(), tau=tau)[0]
    entropy = -(p * logp).nan_to_num().sum().item()
    row = {"softmax": p.tolist(), "entropy": entropy, "effective_classes": math.exp(entropy),
           "scaled_logits": [v / tau for v in logits]}
    if target is None:
        return row
    loss = reference.cross_entropy(x, torch.tensor([target]), tau=t)
    loss.backward()
    row.update(cross_entropy=loss.item(), grad_logits=x.grad[0].tolist(), grad_tau=t.grad.item())
    if logits[target] == max(logits):
        others = [j for j in range(len(logits)) if j != target]
        p = p.tolist()
        exact = {"cross_entropy": math.log1p(math.fsum(math.exp((logits[j] - logits[target]) / tau) for j in others)),
                 "grad_tau": -math.fsum(p[j] * (logits[j] - logits[target]) for j in others) / tau ** 2}
        grad = [p[j] / tau for j in range(len(logits))]
        grad[target] = -math.fsum(p[j] for j in others) / tau
        exact["grad_logits"] = grad
        scale = max(abs(v) for v in logits) / tau  # the size of the terms that cancel in the reference
        for key, value in exact.items():
            torch.testing.assert_close(torch.tensor(row[key]), torch.tensor(value), rtol=1e-12,
                                       atol=1e-14 * scale / min(tau, 1))
        row.update(exact)
    return row


def test_table_defaults_are_the_seeds_examples(capsys):
    code, out, err = run(capsys, "table")
    assert code == 0 and err == ""
    tables = parse_table_output(out)
    titles = list(tables)
    assert titles == ["the softmax temperature post: logits [1, 2, 3], target 2",
                      "the temperature-scaling post: logits [1, 5, 7, 10]",
                      "the contrastive-learning post, the positive is nearest: logits [0.5, 0.25, -0.45, -0.1], target 0",
                      "the contrastive-learning post, a negative is nearest: logits [0.25, 0.5, -0.45, -0.1], target 0"]
    seed000, seed002, seed003a, seed003b = (tables[t] for t in titles)

    for tau, probs, loss in SEED_000:
        rows = seed000[tau]
        assert_printed([float(r["softmax(x/tau)"]) for r in rows], probs)
        assert rows[2]["class"] == "2*"
        ce = float(rows[0]["CE"])
        if tau == 0.1:
            # the seed's 4.5418e-05 is torch's fp32 rounding; the exact loss is log1p(e^-10 + e^-20)
            assert loss == "4.5418e-05" and rows[0]["CE"] == "4.5401e-05"
            assert close(ce, math.log1p(math.exp(-10) + math.exp(-20)))
        else:
            assert_printed([ce], [loss])
    for tau, probs in SEED_002.items():  # printed by the seed in full double precision
        got = [float(r["softmax(x/tau)"]) for r in seed002[float(tau)]]
        assert all(close(g, p) for g, p in zip(got, probs)), (tau, got)
    for tau, probs, loss in SEED_003_A:
        rows = seed003a[tau]
        assert_printed([float(r["softmax(x/tau)"]) for r in rows], probs, truncated=True)
        if tau == 0.01:  # torch's fp32 printed 0; the exact loss log1p(e^-25 + e^-60 + e^-95) is 1.3888e-11
            assert rows[0]["CE"] == "1.3888e-11"
        else:
            assert_printed([float(rows[0]["CE"])], [loss], truncated=True)
    for tau, loss in SEED_003_B:
        assert_printed([float(seed003b[tau][0]["CE"])], [loss], truncated=True)
    assert list(seed002) == [0.1, 1.0, 10.0, 100.0, 10000.0]
    assert "dCE/dx" not in seed002[1.0][0]  # no target, no loss columns


def test_table_text_matches_the_float64_reference(capsys):
    code, out, _ = run(capsys, "table")
    assert code == 0
    tables = parse_table_output(out)
    for (_, logits, target, taus), groups in zip(cli.SEED_EXAMPLES, tables.values()):
        for tau in taus:
            ref, rows = reference_row(list(logits), tau, target), groups[tau]
            for i, r in enumerate(rows):
                assert close(float(r["softmax(x/tau)"]), ref["softmax"][i]), (tau, i, r)
                assert close(float(r["x/tau"]), ref["scaled_logits"][i])
                if target is not None:
                    assert close(float(r["dCE/dx"]), ref["grad_logits"][i], digits=4), (tau, i, r)
            assert close(float(rows[0]["H (nats)"]), ref["entropy"], digits=4)
            assert close(float(rows[0]["exp(H)"]), ref["effective_classes"])
            if target is not None:
                assert close(float(rows[0]["CE"]), ref["cross_entropy"], digits=4)
                assert close(float(rows[0]["dCE/dtau"]), ref["grad_tau"], digits=4)


def test_table_json_is_the_float64_reference(capsys):
    code, out, _ = run(capsys, "table", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["dtype"] == "float64" and len(report["examples"]) == len(cli.SEED_EXAMPLES)
    for example in report["examples"]:
        for row in example["rows"]:
            ref = reference_row(example["logits"], row["tau"], example["target"])
            for key in ("softmax", "scaled_logits", "entropy", "effective_classes"):
                torch.testing.assert_close(torch.tensor(row[key]), torch.tensor(ref[key]), rtol=1e-12, atol=1e-15)
            if example["target"] is not None:
                for key in ("cross_entropy", "grad_logits", "grad_tau"):
                    torch.testing.assert_close(torch.tensor(row[key]), torch.tensor(ref[key]), rtol=1e-10, atol=0)
    seed000 = report["examples"][0]["rows"][2]
    assert seed000["tau"] == 0.1
    assert seed000["cross_entropy"] == pytest.approx(math.log1p(math.exp(-10) + math.exp(-20)), rel=1e-14)
    # dL/dτ = (x_y − Σ p_i x_i) / τ² (DESIGN.md), from the printed probabilities
    p = seed000["softmax"]
    assert seed000["grad_tau"] == pytest.approx((3 - sum(pi * xi for pi, xi in zip(p, [1, 2, 3]))) / 0.01,
                                                rel=1e-9)


def test_table_with_given_logits_tau_and_target(capsys):
    code, out, _ = run(capsys, "table", "--logits=-1,5,7,10", "--tau", "0.1,1,10", "--target", "3")
    assert code == 0
    (title, groups), = parse_table_output(out).items()
    assert title == "logits [-1, 5, 7, 10], target 3"
    assert list(groups) == [0.1, 1.0, 10.0]
    for tau, rows in groups.items():
        ref = reference_row([-1.0, 5.0, 7.0, 10.0], tau, 3)
        assert [r["class"] for r in rows] == ["0", "1", "2", "3*"]
        assert close(float(rows[0]["CE"]), ref["cross_entropy"], digits=4)
        assert close(float(rows[0]["exp(H)"]), ref["effective_classes"])
    # τ without --logits: the seed examples at those τ; logits without --tau: τ = 0.1, 1, 10
    code, out, _ = run(capsys, "table", "--tau", "2")
    assert code == 0 and all(list(g) == [2.0] for g in parse_table_output(out).values())
    code, out, _ = run(capsys, "table", "--logits", "1,2", "--json")
    rows = json.loads(out)["examples"][0]["rows"]
    assert [r["tau"] for r in rows] == [0.1, 1.0, 10.0] and "cross_entropy" not in rows[0]


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("argv,message", [
    ([], "required"),
    (["nope"], "invalid choice: 'nope'"),
    (["table", "--bogus"], "unrecognized arguments: --bogus"),
    (["table", "--logits", "1,x,3"], "argument --logits: 'x' in '1,x,3' is not a number"),
    (["table", "--logits", "1,nan"], "--logits: 'nan' in '1,nan' is not a finite number"),
    (["table", "--tau", "0,1"], "argument --tau: every temperature must be > 0, got 0"),
    (["table", "--tau=-0.5"], "argument --tau: every temperature must be > 0, got -0.5"),
    (["table", "--tau", "inf"], "argument --tau: 'inf' in 'inf' is not a finite number"),
    (["table", "--logits", "1,2,3", "--target", "3"], "--target 3 is out of range for 3 logits (0 to 2)"),
    (["table", "--logits", "1,2,3", "--target", "-1"], "--target -1 is out of range"),
    (["table", "--logits", "1,2,3", "--target", "x"], "argument --target: invalid int value: 'x'"),
    (["table", "--target", "1"], "--target needs --logits"),
    (["table", "--logits", "1,2", "--tau", "1e-320"], "overflow"),
    (["demo"], "required"),
    (["demo", "nope"], "invalid choice: 'nope'"),
    (["demo", "contrastive", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["demo", "contrastive", "--lr", "-1"], "argument --lr: must be positive and finite"),
    (["demo", "contrastive", "--negatives", "76", "--no-plot"], "--negatives 76 is more than the 75 points"),
    (["demo", "gumbel", "--logits", "1", "--no-plot"], "--logits needs at least two classes"),
    (["demo", "gumbel", "--draws", "1.5"], "argument --draws: '1.5' is not an integer"),
    (["demo", "smoothmax", "--seed", "-1"], "argument --seed: must be in [0, 2**63), got -1"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, *(["--out", tmp_path] if argv[:1] == ["demo"] and len(argv) > 1 else []))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("fused-tau") and ": error: " in err, err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, out, err = run(capsys, "demo", "smoothmax", "--no-plot", "--out", blocker / "sub")
    assert code == 1 and err.count("\n") == 1 and err.startswith("fused-tau demo smoothmax: error: cannot write")


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, as on an install without the plot extra."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.mark.parametrize("demo", ["contrastive", "gumbel", "smoothmax"])
def test_missing_matplotlib_is_one_line_before_any_work(capsys, tmp_path, no_matplotlib, demo):
    code, out, err = run(capsys, "demo", demo, "--out", tmp_path)
    assert code == 1 and out == ""
    assert err == (f"fused-tau demo {demo}: error: matplotlib is needed to draw the PNG: "
                   "pip install 'fused_tau[plot]' (or pip install matplotlib), or pass --no-plot\n")
    assert list(tmp_path.iterdir()) == []


def test_no_plot_needs_no_matplotlib(capsys, tmp_path, no_matplotlib):
    code, out, _ = run(capsys, "demo", "smoothmax", "--no-plot", "--out", tmp_path)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoothmax.json"]


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "table" in out and "demo" in out and "info" in out
    code, out, _ = run(capsys, "demo", "contrastive", "--help")
    assert code == 0 and "--steps" in out and "--batch" in out and "--out" in out and "--seed" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"fused_tau {fused_tau.__version__}"


# ---------------------------------------------------------------- info

def test_info_lists_versions_and_the_backend_of_every_op(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert re.search(rf"^fused_tau\s+{re.escape(fused_tau.__version__)}$", out, re.M)
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)}$", out, re.M)
    assert re.search(r"^triton\s+(\d+\.\d+|not installed)", out, re.M)
    assert re.search(r"^python\s+3\.", out, re.M) and "cpu (" in out
    for op, _ in PUBLIC_OPS:
        line = next(line for line in out.splitlines() if line.startswith(op + " "))
        expected = fused_tau.backend_for(torch.zeros(1))
        assert re.search(rf"\s{expected}\s", line), line
        if torch.cuda.is_available():
            cuda_choice, _ = explain_backend(torch.zeros(1, device="cuda"))
            assert cuda_choice == fused_tau.backend_for(torch.zeros(1, device="cuda")) and f"  {cuda_choice}  " in line


def test_info_covers_every_public_op():
    ops = {name for name in fused_tau.__all__ if name[0].islower() and callable(getattr(fused_tau, name))}
    # backend_for/backend_info are the dispatch itself; gumbel_tau_schedule takes no tensor
    assert ops - {"backend_for", "backend_info", "gumbel_tau_schedule"} == {op for op, _ in PUBLIC_OPS}


def test_info_explains_a_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "reference")
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert all(re.search(rf"^{op}\s.*\sreference\s+FUSED_TAU_BACKEND=reference$", out, re.M) for op, _ in PUBLIC_OPS)
    if fused_tau._dispatch.triton_available() and not torch.cuda.is_available():
        monkeypatch.setenv("FUSED_TAU_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        code, out, _ = run(capsys, "info")  # a backend that cannot serve CPU tensors is reported, not raised
        assert code == 0 and "error" in out and "TRITON_INTERPRET=1" in out


# ---------------------------------------------------------------- as installed

def _env():
    return {k: v for k, v in os.environ.items() if k not in ("FUSED_TAU_BACKEND",)}


def test_python_m_fused_tau(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fused_tau", "table", "--logits", "1,2,3", "--tau", "1",
                           "--target", "2"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0.40761" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fused_tau", "table", "--tau", "0"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "fused-tau table: error: argument --tau: every temperature must be > 0, got 0\n"


def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("fused-tau")
    script = str(script) if script.exists() else shutil.which("fused-tau")
    if script is None:
        pytest.skip("the fused-tau console script is not installed (pip install -e .)")
    proc = subprocess.run([script, "demo", "smoothmax", "--no-plot", "--out", str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "40.000" in proc.stdout and (tmp_path / "smoothmax.json").exists()
    proc = subprocess.run([script, "demo", "bogus"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
