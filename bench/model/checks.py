"""The model's checks (``python -m bench.model --check``): spills, shared memory over a block's limit, streaming
loops without 128-bit loads, loops the model cannot count, and predictions that moved from the committed table;
the kernel options' resources on every architecture (``--variants``)."""
from .capture import ARCHS
from .run import arch_facts, spills_of

REGRESSION = 0.10  # a case predicted more than 10% slower (or faster) than the committed table fails the check


def resource_problems(report):
    """Spills, shared memory over a block's limit, a streaming loop without 128-bit loads, loops the
    model could not count: one sentence each."""
    out = []
    for rec in report["cases"]:
        for lch in rec["launches"]:
            where = f"{rec['case']}: {lch['kernel']}"
            out += arch_problems(where, lch)
            hot = lch["hot_loop"]
            # the row engine's streaming loops (the tile engine's combine reads a few fp32 partials a row)
            if hot and not hot["tensor"] and hot["loads"] and (hot["source"] or "").startswith("row"):
                narrow = {k: v for k, v in hot["loads"].items() if not k.endswith(".128")}
                if narrow:
                    out.append(f"{where}: its streaming loop ({hot['source']}) loads with {narrow}, not only "
                               f"128-bit loads")
            for note in lch["notes"]:
                out.append(f"{where}: the model cannot count {note}")
    return out


def arch_problems(where, lch):
    out = []
    for arch in ARCHS:
        a = lch[f"sm{arch}"]
        if spills_of(a):
            out.append(f"{where} spills on sm_{arch} ({a['stack_bytes']} bytes of stack, {a['local_bytes']} of local "
                       f"memory, {a['spill_instructions'] if a['spill_instructions'] is not None else 'unread'} "
                       f"LDL / STL instructions; {a['registers']} registers)")
        if a["shared_bytes"] > a["shared_limit"]:
            out.append(f"{where} needs {a['shared_bytes']} bytes of shared memory on sm_{arch}, over the "
                       f"{a['shared_limit']} a block may have")
    return out


def variant_records(names=None, progress=None):
    """One record per distinct compiled kernel the variants launch (bench/model/variants.py): its
    resources on every architecture, and the variants that launch it."""
    from .variants import launches_of_variants

    records = {}
    for lch in launches_of_variants(names, progress):
        key = tuple(lch.compiled[a].hash for a in ARCHS)
        if key not in records:
            records[key] = dict(kernel=lch.name, variants=[], **{
                f"sm{a}": arch_facts(lch.compiled[a], a, lch.programs(a)) for a in ARCHS},
                constexprs={k: getattr(v, "value", v) for k, v in lch.args.items()
                            if k.isupper() and isinstance(getattr(v, "value", v), (int, bool, str))})
        if lch.variant not in records[key]["variants"]:
            records[key]["variants"].append(lch.variant)
    return list(records.values())


def regressions(report, baseline, tolerance=REGRESSION):
    """Cases whose prediction moved more than ``tolerance`` from ``baseline`` (a committed report)."""
    old = {r["case"]: r for r in baseline["cases"]}
    out = []
    for rec in report["cases"]:
        prev = old.get(rec["case"])
        if prev is None:
            out.append(f"{rec['case']}: not in the committed table (a new case: commit the new table)")
            continue
        for dev, ms in rec["predicted_ms"].items():
            before = prev["predicted_ms"].get(dev)
            if not before:
                continue
            change = ms / before - 1
            if change > tolerance:
                out.append(f"{rec['case']}: predicted {ms:.4g} ms on {dev}, {100 * change:.0f}% slower than the "
                           f"committed {before:.4g} ms")
            elif change < -tolerance:
                out.append(f"{rec['case']}: predicted {ms:.4g} ms on {dev}, {-100 * change:.0f}% faster than the "
                           f"committed {before:.4g} ms: commit the new table with the change")
    return out
