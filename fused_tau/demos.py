"""The experiments behind ``fused-tau demo``: each computes its numbers with fused_tau's own
functions (a JSON-ready dict), formats them as a table, and draws them with matplotlib.

- ``contrastive``: the contrastive-learning post's toy encoder trained by InfoNCE at several τ;
- ``gumbel``: the Gumbel-softmax post's draws against softmax(logits) as τ changes;
- ``smoothmax``: the smooth-max post's softmax and LogSumExp against max as the scale 1/τ changes.

matplotlib is only needed by the ``plot_*`` functions (``load_matplotlib`` says how to get
it); tqdm, when installed, draws the contrastive demo's progress bar.
"""
import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .cross_entropy import cross_entropy
from .sampling import gumbel_softmax
from .softmax import logsumexp, softmax

PER_CLASS = 25  # seed 003: 100 points, 25 in each quadrant
QUADRANTS = ("quadrant I (+,+)", "quadrant II (-,+)", "quadrant III (-,-)", "quadrant IV (+,-)")


def load_matplotlib():
    """matplotlib's ``Figure`` class (drawn off-screen, no pyplot state); ImportError with the
    install hint when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("matplotlib is needed to draw the PNG: pip install 'fused_tau[plot]' "
                          "(or pip install matplotlib), or pass --no-plot") from None
    return Figure


# ---------------------------------------------------------------- text (shared with fused_tau.cli)

def sig(v, digits=5):
    """``v`` to ``digits`` significant digits, trailing zeros kept (4.54e-5 -> '4.5400e-05')."""
    return "0" if v == 0 else format(v, f"#.{digits}g")


def sig_list(values, digits=4):
    return "[" + ", ".join(sig(v, digits) for v in values) + "]"


def typed_list(values):
    """A list the user typed, shortest form: [1.0, 0.5] -> '[1, 0.5]'."""
    return "[" + ", ".join(format(v, "g") for v in values) + "]"


def aligned(header, rows, left=False):
    """``header`` and ``rows`` (lists of strings) as columns two spaces apart, right-aligned
    (numbers) or ``left``-aligned (text)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    pad = str.ljust if left else str.rjust
    return "\n".join("  ".join(pad(cell, w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


@contextlib.contextmanager
def single_threaded():
    """Run torch ops on one thread, then restore the thread count.  The demos' tensors hold a
    few hundred elements: intra-op threads only add wake-ups, and on a busy machine their
    spin-waiting made every op 50x slower (measured on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- progress

class _PlainProgress:
    """A stand-in for tqdm: one stderr line per tenth of the work."""

    def __init__(self, total, desc):
        self.total, self.desc, self.postfix, self.done, self.shown = total, desc, "", 0, 0

    def update(self, n=1):
        self.done += n
        tenth = self.done * 10 // self.total
        if tenth != self.shown:
            self.shown = tenth
            print(f"{self.desc}: {self.done}/{self.total} steps {self.postfix}".rstrip(), file=sys.stderr)

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


def progress_bar(total, desc):
    """A tqdm bar on stderr when tqdm imports, else the plain fallback."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


# ---------------------------------------------------------------- contrastive (seed 003)

def quadrant_points(generator):
    """Seed 003's data: 100 points uniform in the four unit quadrants, 25 each, and their labels
    (0: x, y > 0; 1: x < 0 < y; 2: x, y < 0; 3: y < 0 < x), sorted by label."""
    points = torch.rand(4 * PER_CLASS, 2, generator=generator)
    points[PER_CLASS:2 * PER_CLASS, 0] -= 1
    points[2 * PER_CLASS:3 * PER_CLASS, :] -= 1
    points[3 * PER_CLASS:, 1] -= 1
    return points, torch.arange(4).repeat_interleave(PER_CLASS)


def toy_encoder(seed):
    """Seed 003's encoder, Linear(2, 10) -> Linear(10, 2) -> tanh, no biases; torch's default
    initialisation drawn from ``seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 10, bias=False), nn.Linear(10, 2, bias=False), nn.Tanh())


def draw_triplets(anchor, negatives, generator):
    """(anchor, positive, negatives) indices as in seed 003 for the given anchors: the positive
    uniform in the anchor's quadrant (independently of the anchor, as the seed draws it), and
    ``negatives`` distinct points of the other three quadrants."""
    quadrant = anchor // PER_CLASS
    positive = quadrant * PER_CLASS + torch.randint(0, PER_CLASS, anchor.shape, generator=generator)
    k = torch.rand(len(anchor), 3 * PER_CLASS, generator=generator).argsort(1)[:, :negatives]
    negative = k + PER_CLASS * (k >= quadrant[:, None] * PER_CLASS)  # skip the anchor's own quadrant
    return anchor, positive, negative


def similarities(features, anchor, positive, negative):
    """Cosine similarities, the positive's first: (n_anchors, 1 + negatives)."""
    pos = F.cosine_similarity(features[anchor], features[positive], dim=-1)
    neg = F.cosine_similarity(features[anchor][:, None], features[negative], dim=-1)
    return torch.cat([pos[:, None], neg], 1)


def embedding_metrics(features, labels, tau=None, triplets=None):
    """Alignment and uniformity (Wang & Isola 2020) of the L2-normalised ``features``, in float64:
    alignment = E ||f(x) - f(x+)||^2 over all ordered pairs of distinct points of one quadrant
    (seed 003's positives; α = 2), uniformity = log E exp(-2 ||f(x) - f(y)||^2) over all pairs of
    distinct points (t = 2), a log-mean-exp taken with ``fused_tau.logsumexp``.  Lower is better
    for both: close positives, features spread over the circle.

    With τ and ``triplets``, also the InfoNCE ``loss`` on those triplets and the ``hardness``
    (Wang & Liu 2021): the mean over anchors of the largest relative penalty
    r_j = exp(s_j/τ) / Σ_k exp(s_k/τ) over the anchor's negatives, which is the share of the
    loss's push on negatives (∂L/∂s_j relative to ∂L/∂s_pos) that goes to the hardest one.  It
    runs from 1/K (τ large: all K negatives pushed alike) to 1 (τ → 0: only the hardest), so it
    reads the same at every τ, where a softmax-weighted mean similarity would also move with
    the features being learned."""
    z = F.normalize(features.double(), dim=-1)
    d2 = torch.cdist(z, z).pow(2)
    distinct = ~torch.eye(len(z), dtype=torch.bool)
    same = (labels[:, None] == labels[None, :]) & distinct
    pairs = d2[torch.triu(distinct, 1)]
    out = {"alignment": d2[same].mean().item(),  # host-ok: a demo's report, not a training step
           "uniformity": (logsumexp(-2 * pairs, tau=1.0) - math.log(pairs.numel())).item()}  # host-ok
    if tau is not None:
        sims = similarities(z, *triplets)
        out["loss"] = cross_entropy(sims, torch.zeros(len(sims), dtype=torch.long), tau=tau).item()  # host-ok: offline report
        out["hardness"] = softmax(sims[:, 1:], tau=tau).max(-1).values.mean().item()  # host-ok: offline report
    return out


@single_threaded()
def contrastive(taus, steps, batch, negatives, lr, seed, progress=True):
    """Seed 003's experiment, batched: for each τ, a copy of one initial encoder trained by SGD for
    ``steps`` steps, each on ``batch`` (anchor, positive, ``negatives`` negatives) draws, with
    loss ``fused_tau.cross_entropy([s_pos, s_neg...], 0, reduction='sum', tau=tau)`` on cosine
    similarities.  The sum makes each anchor move the encoder as one step of the seed's
    single-anchor loop at the same lr, so steps × batch is the seed's step count (10000 at the
    defaults 200 × 50).  Every τ sees the same draws: the pictures differ by τ alone.  The points,
    the training draws and the evaluation draws come from generators seeded ``seed``,
    ``seed + 2`` and ``seed + 1``: independent streams, and the global random state is untouched.

    Returns the points, the initial and learned features, and their ``embedding_metrics``
    (hardness and loss on 10 fixed draws of negatives for each of the 100 points)."""
    points, labels = quadrant_points(torch.Generator().manual_seed(seed))
    initial = toy_encoder(seed)
    eval_triplets = draw_triplets(torch.arange(len(points)).repeat(10), negatives,
                                  torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        start = initial(points)
    result = {"experiment": "contrastive", "seed": seed, "steps": steps, "batch": batch, "negatives": negatives,
              "lr": lr, "points": points.tolist(), "labels": labels.tolist(),  # host-ok: offline report
              "untrained": {"features": start.tolist(), **embedding_metrics(start, labels)}, "runs": []}  # host-ok: offline report
    bar = progress_bar(steps * len(taus), "contrastive") if progress else None
    zeros = torch.zeros(batch, dtype=torch.long)
    for tau in taus:
        encoder = toy_encoder(seed)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed + 2)
        if bar is not None:
            bar.set_postfix_str(f"tau={tau:g}")
        for _ in range(steps):
            # a uniform quadrant, then a uniform point in it: a uniform point of the 100
            anchor = torch.randint(0, len(points), (batch,), generator=generator)
            triplet = draw_triplets(anchor, negatives, generator)
            loss = cross_entropy(similarities(encoder(points), *triplet), zeros, tau=tau, reduction="sum")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.update()
        with torch.no_grad():
            learned = encoder(points)
            metrics = embedding_metrics(learned, labels, tau, eval_triplets)
        result["runs"].append({"tau": tau, "features": learned.tolist(), **metrics})  # host-ok: offline report
    if bar is not None:
        bar.close()
    return result


def format_contrastive(result):
    """The metrics of each run (and of the untrained encoder) as an aligned table."""
    header = ["tau", "alignment", "uniformity", "hardness", "InfoNCE loss"]
    u = result["untrained"]
    rows = [["untrained", sig(u["alignment"], 4), sig(u["uniformity"], 4), "-", "-"]]
    rows += [[format(r["tau"], "g"), sig(r["alignment"], 4), sig(r["uniformity"], 4), sig(r["hardness"], 4),
              sig(r["loss"], 4)] for r in result["runs"]]
    return (f"InfoNCE (fused_tau.cross_entropy) on the contrastive-learning post's toy encoder: {result['steps']} steps x "
            f"{result['batch']} anchors,\n{result['negatives']} negatives, lr {result['lr']:g}, seed {result['seed']}. "
            "alignment, uniformity: lower is better (Wang & Isola 2020);\nhardness: the share of the push on "
            f"negatives taken by the hardest, 1/{result['negatives']} to 1 (Wang & Liu 2021).\n"
            + aligned(header, rows))


def _scatter(ax, features, labels, title):
    feats = torch.tensor(features)
    labels = torch.tensor(labels)
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    for q, name in enumerate(QUADRANTS):
        f = feats[labels == q]
        ax.scatter(f[:, 0], f[:, 1], s=14, color=f"C{q}", label=name, alpha=0.8)
    ax.set(xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), aspect="equal", title=title)
    ax.set_xlabel("feature 1", fontsize=8)
    ax.set_ylabel("feature 2", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_contrastive(result, path):
    """A grid: the input points, the untrained features, the learned features at each τ (its
    metrics in the title), and the metrics against τ."""
    Figure = load_matplotlib()
    runs = result["runs"]
    n = len(runs) + 3
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.3 * ncols, 3.5 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    _scatter(axes[0], result["points"], result["labels"], "input: 100 points, 4 quadrants")
    u = result["untrained"]
    _scatter(axes[1], u["features"], result["labels"],
             f"untrained encoder\nalign {u['alignment']:.3f}, unif {u['uniformity']:.3f}")
    for ax, r in zip(axes[2:], runs):
        _scatter(ax, r["features"], result["labels"], f"τ = {r['tau']:g}\nalign {r['alignment']:.3f}, "
                                                      f"unif {r['uniformity']:.3f}, hard {r['hardness']:.2f}")
    ax = axes[len(runs) + 2]
    taus = [r["tau"] for r in runs]
    ax.plot(taus, [r["alignment"] for r in runs], "o-", color="C4", label="alignment (↓)")
    ax.plot(taus, [r["uniformity"] for r in runs], "s-", color="C5", label="uniformity (↓)")
    ax.set(xscale="log", xlabel="τ", ylabel="alignment, uniformity", title="metrics against τ")
    right = ax.twinx()
    right.plot(taus, [r["hardness"] for r in runs], "^--", color="C6", label="hardness (right)")
    right.set(ylim=(0, 1.05), ylabel="hardness")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    for extra in axes[n:]:
        extra.set_axis_off()
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle(f"InfoNCE (the contrastive-learning post's toy) at {len(runs)} temperatures: learned features, "
                 f"{result['steps']} steps × {result['batch']} anchors, {result['negatives']} negatives, "
                 f"seed {result['seed']}", fontsize=10)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- gumbel (seed 004)

@single_threaded()
def gumbel(logits, taus, draws, seed):
    """Seed 004's experiment: for each τ, ``draws`` rows of ``fused_tau.gumbel_softmax(logits, tau)`` (τ second, as in torch)
    (one generator seeded with ``seed``, so every τ gets fresh draws); the frequency of each
    class as the argmax (which should be softmax(logits) at every τ, within 2 standard errors),
    the mean soft sample E[y], and E[max_i y_i], the closeness to one-hot (1: one-hot, 1/C: flat)."""
    x = torch.tensor(logits, dtype=torch.float32)
    p = softmax(x.double()).tolist()  # host-ok: offline report
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for tau in taus:
        y = gumbel_softmax(x.expand(draws, len(logits)).contiguous(), tau, generator=generator)
        freq = (torch.bincount(y.argmax(-1), minlength=len(logits)).double() / draws).tolist()  # host-ok: offline report
        rows.append({"tau": tau, "argmax_frequency": freq,
                     "max_abs_deviation": max(abs(a - b) for a, b in zip(freq, p)),
                     "mean_sample": y.double().mean(0).tolist(),  # host-ok: offline report
                     "mean_max": y.double().max(-1).values.mean().item()})  # host-ok: offline report
    two_se = 2 * max(math.sqrt(q * (1 - q) / draws) for q in p)
    return {"experiment": "gumbel", "seed": seed, "logits": list(logits), "draws": draws, "softmax": p,
            "two_standard_errors": two_se, "runs": rows}


def format_gumbel(result):
    header = ["tau", "argmax frequency", "max |freq - p|", "E[y] (mean soft sample)", "E[max y]"]
    rows = [[format(r["tau"], "g"), sig_list(r["argmax_frequency"]), sig(r["max_abs_deviation"], 4),
             sig_list(r["mean_sample"]), sig(r["mean_max"], 4)] for r in result["runs"]]
    return (f"fused_tau.gumbel_softmax(logits={typed_list(result['logits'])}, tau), {result['draws']} draws per tau;\n"
            f"p = softmax(logits) = {sig_list(result['softmax'])}, 2 standard errors = "
            f"{sig(result['two_standard_errors'], 3)}.\nThe argmax is a draw from p at every tau; tau only sets "
            "how close y is to one-hot (E[max y] = 1) or to flat.\n" + aligned(header, rows))


def plot_gumbel(result, path):
    """Argmax frequencies per τ beside softmax(logits), the mean soft sample against τ, and the
    closeness to one-hot against τ."""
    Figure = load_matplotlib()
    runs, p, C = result["runs"], result["softmax"], len(result["softmax"])
    taus = [r["tau"] for r in runs]
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    width = 0.8 / (len(runs) + 1)
    for i, r in enumerate(runs):
        a.bar([k + i * width for k in range(C)], r["argmax_frequency"], width, color=f"C{i}",
              label=f"τ = {r['tau']:g}")
    a.bar([k + len(runs) * width for k in range(C)], p, width, color="black", label="softmax(logits) ± 2 s.e.",
          yerr=result["two_standard_errors"], capsize=2)
    a.set_xticks([k + 0.4 - width / 2 for k in range(C)], [f"class {k}\n({v:g})" for k, v in
                                                              enumerate(result["logits"])])
    a.set(ylabel="frequency as argmax", title=f"argmax of {result['draws']} Gumbel-softmax draws")
    a.legend(fontsize=7)
    for k in range(C):
        b.plot(taus, [r["mean_sample"][k] for r in runs], "o-", color=f"C{k}", label=f"class {k}")
        b.axhline(p[k], color=f"C{k}", ls="--", lw=0.8)
    b.axhline(1 / C, color="0.5", ls=":", label=f"1/C = {1 / C:.3g}")
    b.set(xscale="log", xlabel="τ", ylabel="E[y_k]  (dashed: softmax(logits)_k)",
          title="mean soft sample E[y]: → softmax(logits), then flat")
    b.legend(fontsize=7)
    c.plot(taus, [r["mean_max"] for r in runs], "o-", color="C3", label="E[max_k y_k]")
    c.axhline(1, color="0.3", ls="--", lw=0.8, label="one-hot")
    c.axhline(1 / C, color="0.5", ls=":", label="flat (1/C)")
    c.set(xscale="log", xlabel="τ", ylabel="E[max_k y_k]", ylim=(0, 1.05), title="closeness to one-hot")
    c.legend(fontsize=7)
    fig.suptitle(f"Gumbel-softmax: logits {typed_list(result['logits'])}, seed {result['seed']}",
                 fontsize=11)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- smoothmax (seed 001)

def smoothmax(logits, taus, seed):
    """Seed 001's point: softmax(x/τ) and LSE(x/τ) = ``fused_tau.logsumexp(x, tau=τ) / τ`` against
    max(x/τ) for each τ (the scale 1/τ), all in float64; and, for the picture, the same on a log
    grid of τ and the two-class smooth max τ·LSE((a, 0)/τ) against max(a, 0).  ``seed`` is only
    recorded: nothing here is random."""
    x = torch.tensor([logits], dtype=torch.float64)
    n, top = len(logits), max(logits)
    rows = []
    for tau in taus:
        lse = logsumexp(x, tau=tau).item() / tau  # host-ok: offline report
        rows.append({"tau": tau, "scale": 1 / tau, "softmax": softmax(x, tau=tau)[0].tolist(), "lse": lse,  # host-ok: offline report
                     "max": top / tau, "gap": lse - top / tau, "smooth_max": tau * lse})
    grid = torch.logspace(-2, 2, 81, dtype=torch.float64)
    xs = x.expand(len(grid), n)
    a = torch.linspace(-3, 3, 121, dtype=torch.float64)
    pair = torch.stack([a, torch.zeros_like(a)], 1)
    return {"experiment": "smoothmax", "seed": seed, "logits": list(logits), "log_n": math.log(n), "runs": rows,
            "curve": {"tau": grid.tolist(), "softmax": softmax(xs, tau=grid).tolist(),  # host-ok: offline report
                      "lse": (logsumexp(xs, tau=grid) / grid).tolist()},  # host-ok: offline report
            "pair": {"a": a.tolist(), "smooth_max": {format(t, "g"): logsumexp(pair, tau=t).tolist() for t in taus}}}  # host-ok: offline report


def format_smoothmax(result):
    header = ["tau", "scale 1/tau", "softmax(x/tau)", "LSE(x/tau)", "max(x/tau)", "LSE - max",
              "tau*LSE(x/tau)"]
    rows = [[format(r["tau"], "g"), format(r["scale"], "g"), sig_list(r["softmax"]), sig(r["lse"], 5),
             sig(r["max"], 5), sig(r["gap"], 5), sig(r["smooth_max"], 5)] for r in result["runs"]]
    return (f"x = {typed_list(result['logits'])}: LSE(x/tau) - max(x/tau) lies in (0, log n = {result['log_n']:.4f}];\n"
            "the smooth max tau*LSE(x/tau) -> max(x) as tau -> 0 (LSE by fused_tau.logsumexp, float64)\n"
            + aligned(header, rows))


def plot_smoothmax(result, path):
    """softmax(x/τ) against τ, the smooth max τ·LSE(x/τ) against τ with its bounds, and the
    two-class smooth max against the hinge max(a, 0) at each τ."""
    Figure = load_matplotlib()
    curve, logits = result["curve"], result["logits"]
    n, top = len(logits), max(logits)
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    probs = torch.tensor(curve["softmax"])
    for k in range(n):
        a.plot(curve["tau"], probs[:, k], color=f"C{k}", label=f"x = {logits[k]:g}")
    for r in result["runs"]:
        a.scatter([r["tau"]] * n, r["softmax"], color="black", s=12, zorder=3)
    a.axhline(1 / n, color="0.5", ls=":", label=f"uniform 1/n = {1 / n:.3g}")
    a.set(xscale="log", xlabel="τ", ylabel="softmax(x/τ)", ylim=(-0.02, 1.02),
          title="softmax(x/τ): one-hot max at small τ, flat at large τ")
    a.legend(fontsize=7)
    b.plot(curve["tau"], curve["lse"], color="C0", label="LSE(x/τ)")
    b.plot(curve["tau"], [top / t for t in curve["tau"]], color="black", lw=1, ls="--", label="max(x/τ)")
    b.axhline(result["log_n"], color="0.5", ls=":", label=f"log n = {result['log_n']:.3g} (LSE's floor)")
    b.scatter([r["tau"] for r in result["runs"]], [r["lse"] for r in result["runs"]], color="black",
              s=12, zorder=3, label="the table's τ")
    b.set(xscale="log", yscale="log", xlabel="τ  (scale 1/τ)", ylabel="value",
          title="LSE(x/τ) against max(x/τ): equal at small τ")
    b.legend(fontsize=7)
    pair = result["pair"]
    c.plot(pair["a"], [max(v, 0.0) for v in pair["a"]], color="black", lw=1.5, label="max(a, 0)")
    for i, (tau, values) in enumerate(pair["smooth_max"].items()):
        c.plot(pair["a"], values, color=f"C{i}", label=f"τ·LSE((a, 0)/τ), τ = {tau}")
    c.set(xlabel="a", ylabel="value", title="two classes: the smooth max τ·LSE against max")
    c.legend(fontsize=7)
    fig.suptitle(f"Softmax and LogSumExp against max: x = {typed_list(logits)}", fontsize=11)
    fig.savefig(path, dpi=110)
