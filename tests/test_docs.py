"""The committed docs/ are what the commands print: each demo rerun at its defaults (as the docs were
made: `fused-tau demo NAME --out docs`) must give the committed JSON and text.

Regenerate after a numerics change with
    for d in contrastive gumbel smoothmax; do python -m fused_tau demo $d --out docs > docs/$d.txt; done

Tolerances: smoothmax is float64 arithmetic (1e-9); the Gumbel draws come from a seeded generator, so
their frequencies match to a few draws in 10,000 (a near-tie may flip on another CPU's rounding);
the contrastive training at τ >= 0.01 is stable (1e-4), while at τ = 0.001 it is chaotic (an ulp
anywhere changes where 200 SGD steps end), so only its shape and finiteness are checked.
"""
import json
import math
from pathlib import Path

import pytest

from .cli_support import _default_dispatch, run  # noqa: F401  (_default_dispatch: an autouse fixture)

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHAOTIC_TAU = 0.005  # contrastive runs below this τ are compared for shape only


def _compare(ours, theirs, rtol, atol, path="", skip=lambda path, value: False):
    if skip(path, theirs):
        return
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), path
        for key in theirs:
            _compare(ours[key], theirs[key], rtol, atol, f"{path}/{key}", skip)
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _compare(a, b, rtol, atol, f"{path}[{i}]", skip)
    elif isinstance(theirs, float):
        assert math.isclose(ours, theirs, rel_tol=rtol, abs_tol=atol), f"{path}: {ours} vs committed {theirs}"
    else:
        assert ours == theirs, path


def _chaotic_run(result):
    """The paths of the contrastive runs at τ below CHAOTIC_TAU."""
    return {f"/runs[{i}]" for i, r in enumerate(result.get("runs", [])) if r.get("tau", 1.0) < CHAOTIC_TAU}


@pytest.mark.parametrize("name,rtol,atol", [("smoothmax", 1e-9, 1e-12), ("gumbel", 0.0, 1e-3),
                                            ("contrastive", 1e-4, 1e-6)])
def test_committed_demo_output_is_what_the_command_prints(capsys, tmp_path, name, rtol, atol):
    code, out, err = run(capsys, "demo", name, "--out", tmp_path, "--no-plot")
    assert code == 0, err
    committed = json.loads((DOCS / f"{name}.json").read_text())
    fresh = json.loads((tmp_path / f"{name}.json").read_text())
    chaotic = _chaotic_run(committed)

    def skip(path, value):
        return any(path.startswith(c + "/") and not path.endswith("/tau") for c in chaotic)

    _compare(fresh, committed, rtol, atol, skip=skip)
    for c in chaotic:  # shape and finiteness of the chaotic runs
        i = int(c[len("/runs["):-1])
        run_ = fresh["runs"][i]
        assert len(run_["features"]) == len(committed["runs"][i]["features"])
        assert all(math.isfinite(v) for v in (run_["alignment"], run_["uniformity"], run_["loss"]))
    # the committed text is the command's output, but for the chaotic rows' numbers and the output folder
    text = (DOCS / f"{name}.txt").read_text().splitlines()
    printed = out.splitlines()
    assert len(printed) == len(text)
    chaotic_taus = {format(committed["runs"][int(c[len("/runs["):-1])]["tau"], "g") for c in chaotic}
    numeric = name != "smoothmax"  # gumbel and contrastive rows carry sampled / trained numbers
    for ours, theirs in zip(printed, text):
        if theirs.startswith("wrote "):
            continue
        first = theirs.split()[0] if theirs.split() else ""
        if first in chaotic_taus:
            continue
        if numeric and ours != theirs:
            _compare([float(v) for v in _numbers(ours)], [float(v) for v in _numbers(theirs)], max(rtol, 1e-3),
                     max(atol, 1e-3))
            assert _words(ours) == _words(theirs)
        else:
            assert ours == theirs


def _numbers(line):
    import re

    return re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", line)


def _words(line):
    import re

    return re.sub(r"-?\d+\.?\d*(?:e[-+]?\d+)?", "#", line)
