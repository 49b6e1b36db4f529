"""The ``fused-tau`` command (also ``python -m fused_tau``): see what τ does, in seconds.

    fused-tau table [--logits 1,5,7,10] [--tau 0.1,1,10] [--target 3] [--json]
    fused-tau demo contrastive|gumbel|smoothmax [--out DIR] [--seed N] [...]
    fused-tau info

Every number is computed with fused_tau's own functions (softmax, log_softmax,
logsumexp, cross_entropy with a learnable τ, gumbel_softmax); the demos live in
``fused_tau.demos``.  Bad arguments end in one line on stderr and exit code 2.
"""
import argparse
import json
import math
import os
import platform
import sys

import torch

from . import __version__, demos
from .demos import aligned, sig, typed_list
from ._dispatch import backend_info, interpreter_on, triton_available
from .cross_entropy import cross_entropy
from .softmax import log_softmax, softmax

PROG = "fused-tau"

# The examples the blog posts on the temperature print (the project's seed documents 000, 002, 003):
# (source, logits, target or None, τ values).
SEED_EXAMPLES = (
    ("the softmax temperature post", (1.0, 2.0, 3.0), 2, (1.0, 0.5, 0.1)),
    ("the temperature-scaling post", (1.0, 5.0, 7.0, 10.0), None, (0.1, 1.0, 10.0, 100.0, 10000.0)),
    ("the contrastive-learning post, the positive is nearest", (0.5, 0.25, -0.45, -0.1), 0, (1.0, 0.5, 0.05, 0.01)),
    ("the contrastive-learning post, a negative is nearest", (0.25, 0.5, -0.45, -0.1), 0, (1.0, 0.5, 0.05, 0.01)),
)
LEGEND = ("Computed in float64 by fused_tau: softmax(x/tau); CE = fused_tau.cross_entropy(x, target, tau=tau)\n"
          "and its gradients dCE/dx, dCE/dtau by autograd (* marks the target);\n"
          "H = the entropy of softmax(x/tau) in nats, exp(H) = the effective number of classes.")


class CLIError(Exception):
    """A user error: ``main`` prints ``PROG: error: message`` on stderr and returns ``code``
    (2 for bad arguments, as argparse, 1 for what the environment lacks)."""

    def __init__(self, message, code=2, prog=PROG):
        super().__init__(message)
        self.code, self.prog = code, prog


class _Parser(argparse.ArgumentParser):
    """argparse, but an error raises CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise CLIError(message, prog=self.prog)


# ---------------------------------------------------------------- argument types

def number_list(text):
    """'1,5,7,10' -> [1.0, 5.0, 7.0, 10.0]: a non-empty list of finite numbers."""
    values = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} in {text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} in {text!r} is not a finite number")
        values.append(v)
    return values


def tau_list(text):
    """A comma-separated list of temperatures, each positive and finite."""
    values = number_list(text)
    bad = [v for v in values if v <= 0]
    if bad:
        raise argparse.ArgumentTypeError(f"every temperature must be > 0, got {bad[0]:g}")
    return values


def positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return v


def seed_int(text):
    """A torch seed: an integer in [0, 2**63)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {v}")
    return v


# ---------------------------------------------------------------- checks

def non_finite(obj):
    """The first non-finite float in a nest of dicts and lists, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for v in values:
        bad = non_finite(v)
        if bad is not None:
            return bad
    return None


def require_finite(result, prog, what, hint="use smaller logits or a larger --tau"):
    """Refuse results that overflowed (x/τ beyond the dtype's range, a diverged training run):
    they would print as nan and make invalid JSON."""
    bad = non_finite(result)
    if bad is not None:
        raise CLIError(f"{what} gives {bad} (overflow): {hint}", prog=prog)


# ---------------------------------------------------------------- table

def temperature_row(logits, tau, target=None):
    """For one τ, computed in float64 by fused_tau: x/τ, softmax(x/τ), its entropy H (nats)
    and exp(H), the effective number of classes; with a target, the cross-entropy
    ``fused_tau.cross_entropy(x, target, tau=tau)`` and its gradients (autograd through
    fused_tau's backward) with respect to the logits and to τ."""
    x = torch.tensor([logits], dtype=torch.float64)
    p = softmax(x, tau=tau)[0]
    # 0 * log 0 = 0: a class whose probability underflows contributes nothing
    # host-ok (here and below): the command line prints numbers; it is not a training step
    entropy = -torch.where(p > 0, p * log_softmax(x, tau=tau)[0], torch.zeros_like(p)).sum().item()  # host-ok: offline report
    row = {"tau": tau, "scaled_logits": (x[0] / tau).tolist(), "softmax": p.tolist(),  # host-ok
           "entropy": entropy, "effective_classes": math.exp(entropy)}
    if target is not None:
        xg = x.clone().requires_grad_(True)
        t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        loss = cross_entropy(xg, torch.tensor([target]), tau=t)
        loss.backward()
        row.update(cross_entropy=loss.item(), grad_logits=xg.grad[0].tolist(), grad_tau=t.grad.item())  # host-ok
    return row


def table_examples(args):
    """The examples to tabulate: the user's logits, or the seeds' (at the user's τ if given)."""
    if args.logits is None:
        if args.target is not None:
            raise CLIError("--target needs --logits (the seed examples have their own targets)", prog=f"{PROG} table")
        return [(f"{source}: logits {typed_list(logits)}" + (f", target {target}" if target is not None else ""),
                 logits, target, args.tau or taus) for source, logits, target, taus in SEED_EXAMPLES]
    if args.target is not None and not 0 <= args.target < len(args.logits):
        raise CLIError(f"--target {args.target} is out of range for {len(args.logits)} logits "
                       f"(0 to {len(args.logits) - 1})", prog=f"{PROG} table")
    title = f"logits {typed_list(args.logits)}" + (f", target {args.target}" if args.target is not None else "")
    return [(title, args.logits, args.target, args.tau or [0.1, 1.0, 10.0])]


def format_table(example):
    """One example as text: a row per (τ, class); the per-τ numbers on the τ's first row."""
    has_target = example["target"] is not None
    header = ["tau", "class", "x/tau", "softmax(x/tau)"]
    header += ["dCE/dx", "CE", "dCE/dtau"] if has_target else []
    header += ["H (nats)", "exp(H)"]
    rows = []
    for r in example["rows"]:
        for i, (z, p) in enumerate(zip(r["scaled_logits"], r["softmax"])):
            first = i == 0
            mark = "*" if has_target and i == example["target"] else ""
            cells = [format(r["tau"], "g") if first else "", f"{i}{mark}", sig(z), sig(p)]
            if has_target:
                cells += [sig(r["grad_logits"][i]), sig(r["cross_entropy"]) if first else "",
                          sig(r["grad_tau"]) if first else ""]
            cells += [sig(r["entropy"]) if first else "", sig(r["effective_classes"]) if first else ""]
            rows.append(cells)
    return f"{example['title']}\n{aligned(header, rows)}"


def cmd_table(args):
    examples = []
    for title, logits, target, taus in table_examples(args):
        rows = []
        for tau in taus:
            rows.append(temperature_row(list(logits), tau, target))
            require_finite(rows[-1], f"{PROG} table", f"tau={tau:g} on logits {typed_list(logits)}")
        examples.append({"title": title, "logits": list(logits), "target": target, "rows": rows})
    if args.json:
        print(json.dumps({"dtype": "float64", "examples": examples}, indent=2))
    else:
        print("\n\n".join([LEGEND] + [format_table(e) for e in examples]))
    return 0


# ---------------------------------------------------------------- info

def package_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args):
    triton = package_version("triton")
    if triton != "not installed" and not triton_available():
        triton += " (does not import)"
    cuda = torch.cuda.is_available()
    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] if cuda \
        else ["cuda not available"]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    facts = [("fused_tau", __version__), ("torch", torch.__version__), ("triton", triton),
             ("python", f"{platform.python_version()} ({platform.python_implementation()}, "
                        f"{platform.system()} {platform.machine()})"),
             ("devices", "; ".join(devices)),
             ("FUSED_TAU_BACKEND", os.environ.get("FUSED_TAU_BACKEND") or "(unset)"),
             ("TRITON_INTERPRET", "1" if interpreter_on() else os.environ.get("TRITON_INTERPRET", "(unset)"))]
    width = max(len(k) for k, _ in facts)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in facts))
    devices = ["cpu"] + (["cuda"] if cuda else [])
    infos = [backend_info(d) for d in devices]
    header = ["op", "dispatches on"] + [h for d in devices for h in (f"{d} float32", "why")]
    rows = [[op, infos[0][op]["dispatches_on"]] + [c for info in infos for c in (info[op]["backend"], info[op]["why"])]
            for op in infos[0]]
    print()
    print(aligned(header, rows, left=True))
    if triton_available() and not cuda:
        print("\n(FUSED_TAU_BACKEND=triton with TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, "
              "as the tests do.)")
    return 0


# ---------------------------------------------------------------- demo

def _demo_options(name, p):
    """The options of ``demo NAME`` beyond --out, --seed and --no-plot; defaults are the blog post's."""
    if name == "contrastive":
        p.add_argument("--tau", type=tau_list, metavar="T,...", default=[0.99, 0.5, 0.05, 0.01, 0.001],
                       help="temperatures (default: the contrastive post's 0.99,0.5,0.05,0.01,0.001)")
        p.add_argument("--steps", type=positive_int, metavar="N", default=200, help="SGD steps per τ (default 200)")
        p.add_argument("--batch", type=positive_int, metavar="N", default=50,
                       help="anchors per step (default 50; steps x batch = the post's 10000 anchors)")
        p.add_argument("--negatives", type=positive_int, metavar="N", default=3,
                       help="negatives per anchor, 1 to 75 (default 3)")
        p.add_argument("--lr", type=positive_float, default=3e-4, help="SGD learning rate per anchor (default 3e-4)")
    elif name == "gumbel":
        p.add_argument("--logits", type=number_list, metavar="X,...", default=[0.7, 0.2, 0.1],
                       help="comma-separated logits (default: the Gumbel-softmax post's 0.7,0.2,0.1)")
        p.add_argument("--tau", type=tau_list, metavar="T,...", default=[0.1, 0.2, 0.5, 1.0, 10.0],
                       help="temperatures (default 0.1,0.2,0.5,1,10)")
        p.add_argument("--draws", type=positive_int, metavar="N", default=10000,
                       help="draws per τ (default: the post's 10000)")
    else:
        p.add_argument("--logits", type=number_list, metavar="X,...", default=[1.0, 2.0, 3.0, 4.0],
                       help="comma-separated logits (default: the smooth-max post's 1,2,3,4)")
        p.add_argument("--tau", type=tau_list, metavar="T,...", default=[10.0, 1.0, 0.1],
                       help="temperatures (default 10,1,0.1: the smooth-max post's scales 0.1, 1, 10)")


DEMOS = {
    "contrastive": ("the contrastive-learning post's toy encoder trained by InfoNCE at several τ; features, alignment, "
                    "uniformity, hardness", demos.format_contrastive, demos.plot_contrastive),
    "gumbel": ("the Gumbel-softmax post: argmax frequencies against softmax(logits), closeness to one-hot",
               demos.format_gumbel, demos.plot_gumbel),
    "smoothmax": ("the smooth-max post: softmax and LogSumExp against max as the scale 1/τ changes",
                  demos.format_smoothmax, demos.plot_smoothmax),
}


def run_demo(args):
    """Compute the demo's numbers, print its table, write NAME.json and (unless --no-plot) NAME.png."""
    prog = f"{PROG} demo {args.demo}"
    if not args.no_plot:
        try:  # before the work: a missing matplotlib should not cost a training run
            demos.load_matplotlib()
        except ImportError as e:
            raise CLIError(str(e), code=1, prog=prog) from None
    if args.demo == "contrastive":
        if args.negatives > 3 * demos.PER_CLASS:
            raise CLIError(f"--negatives {args.negatives} is more than the {3 * demos.PER_CLASS} points of the "
                           "other quadrants", prog=prog)
        result = demos.contrastive(args.tau, args.steps, args.batch, args.negatives, args.lr, args.seed)
    elif args.demo == "gumbel":
        if len(args.logits) < 2:
            raise CLIError("--logits needs at least two classes", prog=prog)
        result = demos.gumbel(args.logits, args.tau, args.draws, args.seed)
    else:
        result = demos.smoothmax(args.logits, args.tau, args.seed)
    require_finite(result, prog, f"--tau {','.join(format(t, 'g') for t in args.tau)}",
                   "use a larger --tau or a smaller --lr" if args.demo == "contrastive" else
                   "use smaller logits or a larger --tau")
    _, format_result, plot = DEMOS[args.demo]
    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
        written = [os.path.join(out, f"{args.demo}.json")]
        with open(written[0], "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        if not args.no_plot:
            written.append(os.path.join(out, f"{args.demo}.png"))
            plot(result, written[1])
    except OSError as e:
        raise CLIError(f"cannot write to --out {out}: {e.strerror or e}", code=1, prog=prog) from None
    print(format_result(result))
    print("wrote " + ", ".join(written))
    return 0


# ---------------------------------------------------------------- parser and main

def build_parser():
    parser = _Parser(prog=PROG, description="See what the softmax temperature τ does: tables and pictures "
                                            "computed with fused_tau's own functions.")
    parser.add_argument("--version", action="version", version=f"fused_tau {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{table,demo,info}", required=True)

    table = sub.add_parser("table", help="probabilities, cross-entropy, gradients and entropy against τ",
                           description="Probabilities, cross-entropy and its gradients, entropy H and exp(H) "
                                       "for each τ, in float64.  With no arguments: the examples of "
                                       "the blog posts on the temperature.  Negative values need the = form: --logits=-1,2,3.")
    table.add_argument("--logits", type=number_list, metavar="X,...", help="comma-separated logits, e.g. 1,5,7,10")
    table.add_argument("--tau", type=tau_list, metavar="T,...",
                       help="comma-separated temperatures (default: 0.1,1,10 with --logits, "
                            "else each example's own)")
    table.add_argument("--target", type=int, metavar="CLASS",
                       help="the target class index, for the cross-entropy columns")
    table.add_argument("--json", action="store_true", help="print JSON (full float64 precision)")
    table.set_defaults(run=cmd_table)

    demo = sub.add_parser("demo", help="an experiment: a table, a JSON and a PNG of its numbers")
    kinds = demo.add_subparsers(dest="demo", metavar="{" + ",".join(DEMOS) + "}", required=True)
    for name, (help_text, _, _) in DEMOS.items():
        p = kinds.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", default=".", metavar="DIR",
                       help="directory for NAME.png and NAME.json (default: the current one)")
        p.add_argument("--seed", type=seed_int, default=0, metavar="N",
                       help="random seed (default 0)" if name != "smoothmax" else "recorded only: nothing is random")
        p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
        _demo_options(name, p)
        p.set_defaults(run=run_demo)

    sub.add_parser("info", help="versions, devices and the backend each op uses").set_defaults(run=cmd_info)
    return parser


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except CLIError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return e.code
    except SystemExit as e:  # --help and --version exit through argparse
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (fused-tau table | head): no traceback at exit either
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured in-process)
            pass
        return 1
