"""The fused-tau demos (contrastive, gumbel, smoothmax) end to end on CPU: small sizes, real PNGs,
deterministic JSON for a seed; the contrastive one once at its defaults, which must stay fast."""
import json
import math
import sys
import time

import pytest
import torch

from fused_tau import demos, reference

from .cli_support import (  # noqa: F401  (_default_dispatch: an autouse fixture)
    _default_dispatch, assert_png, close, run, table_after, vector)
from .test_seeds import assert_printed


# ---------------------------------------------------------------- demo contrastive

SMALL_CONTRASTIVE = ["demo", "contrastive", "--steps", "30", "--batch", "16", "--tau", "0.5,0.05"]


def test_contrastive_end_to_end(capsys, tmp_path):
    code, out, err = run(capsys, *SMALL_CONTRASTIVE, "--seed", "3", "--out", tmp_path)
    assert code == 0, err
    assert "contrastive" in err  # the progress bar, on stderr
    assert_png(tmp_path / "contrastive.png")
    result = json.loads((tmp_path / "contrastive.json").read_text())
    assert (result["steps"], result["batch"], result["negatives"], result["seed"]) == (30, 16, 3, 3)
    assert [r["tau"] for r in result["runs"]] == [0.5, 0.05]
    labels = torch.tensor(result["labels"])
    points = torch.tensor(result["points"])
    assert points.shape == (100, 2) and labels.bincount().tolist() == [25] * 4
    quadrant_signs = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    for q, (sx, sy) in enumerate(quadrant_signs):
        assert ((points[labels == q] * torch.tensor([sx, sy])) >= 0).all()
    rows = {r[0]: r for r in table_after(out, "tau")}
    for run_ in [result["untrained"]] + result["runs"]:
        z = torch.nn.functional.normalize(torch.tensor(run_["features"], dtype=torch.float64), dim=-1)
        d2 = torch.cdist(z, z) ** 2
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(100, dtype=torch.bool)
        assert run_["alignment"] == pytest.approx(d2[same].mean().item(), rel=1e-9)
        pairs = d2[torch.triu(torch.ones(100, 100, dtype=torch.bool), 1)]
        assert run_["uniformity"] == pytest.approx(torch.exp(-2 * pairs).mean().log().item(), rel=1e-9)
        key = "untrained" if "tau" not in run_ else format(run_["tau"], "g")
        assert close(float(rows[key][1]), run_["alignment"], 4) and close(float(rows[key][2]), run_["uniformity"], 4)
        if "tau" in run_:
            assert 1 / 3 <= run_["hardness"] <= 1 and run_["loss"] > 0
            assert close(float(rows[key][3]), run_["hardness"], 4)
    assert f"wrote {tmp_path / 'contrastive.json'}, {tmp_path / 'contrastive.png'}" in out


def test_contrastive_is_deterministic_for_a_seed_with_or_without_tqdm(capsys, tmp_path, monkeypatch):
    outs = [tmp_path / name for name in ("a", "b", "c", "d")]
    for path, seed in zip(outs[:3], (7, 7, 8)):
        assert run(capsys, *SMALL_CONTRASTIVE, "--no-plot", "--seed", seed, "--out", path)[0] == 0
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    code, _, err = run(capsys, *SMALL_CONTRASTIVE, "--no-plot", "--seed", 7, "--out", outs[3])
    assert code == 0 and "contrastive: 60/60 steps tau=0.05" in err  # the plain progress fallback
    a, b, c, d = ((p / "contrastive.json").read_bytes() for p in outs)
    assert a == b == d
    assert a != c


def test_contrastive_defaults_reproduce_seed_003_quickly(capsys, tmp_path):
    start = time.perf_counter()
    code, out, _ = run(capsys, "demo", "contrastive", "--no-plot", "--out", tmp_path)
    elapsed = time.perf_counter() - start
    assert code == 0 and elapsed < 60
    result = json.loads((tmp_path / "contrastive.json").read_text())
    assert (result["steps"], result["batch"], result["negatives"], result["lr"]) == (200, 50, 3, 3e-4)
    runs = {r["tau"]: r for r in result["runs"]}
    assert list(runs) == [0.99, 0.5, 0.05, 0.01, 0.001]
    # Wang & Liu: a smaller τ concentrates the loss on the hardest negative
    assert runs[0.99]["hardness"] < runs[0.5]["hardness"] < runs[0.05]["hardness"]
    # seed 003: training spreads the features; τ = 0.001 collapses them onto tanh's corners
    assert all(runs[t]["uniformity"] < result["untrained"]["uniformity"] for t in (0.99, 0.5, 0.05, 0.01))
    corners = torch.tensor(runs[0.001]["features"]).abs()
    assert (corners > 0.99).float().mean() > 0.9


def test_embedding_metrics_on_known_features():
    """Four collapsed clusters at the compass points: alignment 0; uniformity over the pairs at
    squared distances 0 (same cluster), 2 (neighbours) and 4 (opposite); hardness of given sims."""
    labels = torch.arange(4).repeat_interleave(25)
    compass = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    features = 3 * compass[labels]  # the metrics normalise
    n_pairs = 100 * 99 / 2
    same, opposite = 4 * 25 * 24 / 2, 2 * 25 * 25
    neighbours = n_pairs - same - opposite
    expected = math.log((same + neighbours * math.exp(-4) + opposite * math.exp(-8)) / n_pairs)
    anchor = torch.tensor([0, 25])
    triplets = (anchor, torch.tensor([1, 26]), torch.tensor([[25, 50, 75], [0, 50, 75]]))
    m = demos.embedding_metrics(features, labels, 0.5, triplets)
    assert m["alignment"] == 0
    assert m["uniformity"] == pytest.approx(expected, rel=1e-12)
    sims = torch.tensor([[0.0, -1.0, 0.0]], dtype=torch.float64)  # both anchors see the same negatives
    assert m["hardness"] == pytest.approx(reference.softmax(sims, tau=0.5).max().item(), rel=1e-12)
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.0]], dtype=torch.float64)
    assert m["loss"] == pytest.approx(reference.cross_entropy(logits, torch.tensor([0]), tau=0.5).item(), rel=1e-12)


# ---------------------------------------------------------------- demo gumbel

def test_gumbel_end_to_end(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "gumbel", "--draws", "4000", "--tau", "0.1,1,10", "--seed", "1",
                         "--out", tmp_path)
    assert code == 0, err
    assert_png(tmp_path / "gumbel.png")
    result = json.loads((tmp_path / "gumbel.json").read_text())
    assert result["logits"] == [0.7, 0.2, 0.1]  # seed 004's, the default
    # the draws use float32 logits (the kernels' dtype); p is their softmax in float64
    p = reference.softmax(torch.tensor(result["logits"]).double()).tolist()
    assert result["softmax"] == pytest.approx(p, rel=1e-12)
    assert "p = softmax(logits) = [0.4640, 0.2814, 0.2546]" in out  # seed 004's q2 = [0.464, 0.281, 0.255]
    assert_printed(result["softmax"], ["0.464", "0.281", "0.255"])
    rows = {r[0]: r for r in table_after(out, "tau")}
    previous = 1.0
    for r in result["runs"]:
        # the argmax of a Gumbel-softmax draw is a draw from softmax(logits), whatever τ
        assert sum(r["argmax_frequency"]) == pytest.approx(1)
        assert max(abs(f - q) / math.sqrt(q * (1 - q) / 4000) for f, q in zip(r["argmax_frequency"], p)) < 4
        assert sum(r["mean_sample"]) == pytest.approx(1, rel=1e-6)
        assert 1 / 3 < r["mean_max"] < previous  # closer to one-hot as τ falls
        previous = r["mean_max"]
        printed = rows[format(r["tau"], "g")]
        assert vector(printed[1]) == pytest.approx(r["argmax_frequency"], abs=5e-5)
        assert close(float(printed[4]), r["mean_max"], 4)
    assert result["runs"][0]["mean_max"] > 0.9 and result["runs"][-1]["mean_max"] < 0.45


# ---------------------------------------------------------------- demo smoothmax

SEED_001 = {  # τ (1 / the seed's scale): softmax and LSE of the scaled vector, as printed
    10.0: (["0.2138", "0.2363", "0.2612", "0.2887"], "1.6425"),
    1.0: (["0.0321", "0.0871", "0.2369", "0.6439"], "4.4402"),
    0.1: (["9.36e-14", "2.06e-9", "4.54e-5", "1.00"], "40.00"),
}


def test_smoothmax_end_to_end(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "smoothmax", "--out", tmp_path)
    assert code == 0, err
    assert_png(tmp_path / "smoothmax.png")
    result = json.loads((tmp_path / "smoothmax.json").read_text())
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    rows = {r[0]: r for r in table_after(out, "tau")}
    for r in result["runs"]:
        probs, lse = SEED_001[r["tau"]]
        assert_printed(r["softmax"], probs)
        assert_printed([r["lse"]], [lse])
        assert r["lse"] == pytest.approx((reference.logsumexp(x, tau=r["tau"]) / r["tau"]).item(), rel=1e-12)
        assert 0 < r["gap"] <= math.log(4) and r["smooth_max"] == pytest.approx(r["tau"] * r["lse"])
        printed = rows[format(r["tau"], "g")]
        assert_printed(vector(printed[2]), probs)
        assert_printed([float(printed[3])], [lse])
    curve = result["curve"]
    ref = reference.logsumexp(x.expand(len(curve["tau"]), 4), tau=torch.tensor(curve["tau"], dtype=torch.float64))
    got = torch.tensor(curve["lse"], dtype=torch.float64) * torch.tensor(curve["tau"], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
