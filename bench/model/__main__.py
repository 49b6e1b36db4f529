"""``python -m bench.model``: predict every case's time on an H100 and an H200 without a GPU.

The public functions run forward and forward + backward at real shapes (bf16) on CPU tensors; each
Triton launch is compiled for sm_90 and sm_80 through Triton's own runtime specialisation and not
run, torch operators on the way are counted and not run (bench/model/capture.py).  Each launch's
SASS gives its grid and waves, registers, shared memory and resident blocks, spills, the hot loop's
instructions, special-function operations, load widths and tensor-core instructions per element or
tile (bench/model/sass.py); a roofline turns them into time (bench/model/roofline.py, the constants
and their sources).  Beside each case: the eager composition's floor and the predicted ratio.

    python -m bench.model                    # every case: table on stdout, JSON + markdown under bench/results/
    python -m bench.model --ops cross_entropy --no-write
    python -m bench.model --check            # also fail (exit 1) on a spill, shared memory over a block's
                                             # limit, a streaming loop without 128-bit loads, or a case
                                             # predicted >10% off the newest committed bench/results/model-*.json
    python -m bench.model --variants --no-cases --check
                                             # compile every kernel option (bench/model/variants.py) and
                                             # check its registers, spills and shared memory only

Regenerate the committed table after a kernel change: ``python -m bench.model`` (writes
bench/results/model-<today>.json and .md; commit them with the change; the newest table by name is
the one --check and tests/test_model.py compare with).  About 15 s on 2 cores with Triton's cache
warm (~/.triton/cache), 30-60 s cold; --variants adds about a minute cold.  Must run without
TRITON_INTERPRET=1.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default (3.9 warns when unset)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--ops", default=None, help="comma-separated ops (default: every case of the model)")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/model-<date>.json, written only for "
                                               "every case: --ops alone writes nothing); the .md beside it")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on a resource problem or a prediction >10%% off the committed table")
    p.add_argument("--baseline", default=None,
                   help="the table --check compares with (default: the newest bench/results/model-*.json)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown table")
    p.add_argument("--variants", action="store_true",
                   help="also compile every kernel option at small shapes (resources only, into the report's "
                        "'variants')")
    p.add_argument("--no-cases", action="store_true", help="skip the timed cases (with --variants)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("python -m bench.model compiles the kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from . import checks
    from . import run as M

    ops = args.ops.split(",") if args.ops else None
    cases = [] if args.no_cases else M.model_cases(ops)
    baseline_path = args.baseline or M.latest_table()
    baseline = json.loads(open(baseline_path).read()) if baseline_path else None  # read before it is overwritten
    t0 = time.perf_counter()

    def progress(i, n, what):
        print(f"[{i + 1}/{n} {time.perf_counter() - t0:5.1f}s] {getattr(what, 'name', what)}", file=sys.stderr,
              flush=True)

    report = M.run(cases, progress)
    if args.variants:
        report["variants"] = checks.variant_records(progress=progress)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    elif cases:
        print(M.markdown(report))
    if cases and not args.no_write:
        if ops and not args.out:
            # the committed table holds every case: a subset written over it would drop the others' rows
            print("--ops: the committed table is not rewritten with a subset of the cases (pass --out FILE to "
                  "write this report)", file=sys.stderr)
        else:
            out = M.write(report, args.out or M.default_out())
            print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if not args.check:
        return 0
    problems = checks.resource_problems(report)
    for v in report.get("variants", []):
        problems += checks.arch_problems(f"{v['kernel']} ({'; '.join(v['variants'])})", v)
    if cases and baseline is None:
        problems.append("no committed table to compare with (bench/results/model-*.json)")
    elif cases:
        if ops:
            baseline = dict(baseline, cases=[c for c in baseline["cases"] if c["op"] in ops])
        problems += checks.regressions(report, baseline)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"{len(problems)} problem(s); {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
