"""The performance model (bench/model, DESIGN.md "How a kernel's speed is judged without a GPU"):
every kernel is compiled for sm_90 and sm_80 exactly as it would run (Triton's runtime specialisation,
at the model's real shapes and at small shapes for every kernel option), and must spill nothing, fit a
block's shared memory and, in the row engine, stream with 128-bit loads; no case may be predicted more
than 10% off the table committed in bench/results/ (a slower kernel fails here; a faster one commits
its new table with the change: ``python -m bench.model``).  About a minute on 2 cores, Triton's cache
cold (the model's cases and the kernel options compile in two processes at once)."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from bench.model import roofline as R  # noqa: E402
from bench.model import checks  # noqa: E402
from bench.model import run as M  # noqa: E402
from bench.model import sass, sass_loops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Problems the model found in today's kernels, left to the issues that own those kernels.  Each must
# still be there (strict): remove the entry in the commit that fixes it.
KNOWN_SPILLS = {}
KNOWN_NARROW_LOADS = {}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_TAU_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The model's report on its cases, with the kernel options' resources under 'variants'."""
    out = tmp_path_factory.mktemp("model") / "model.json"
    common = dict(cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cases = subprocess.Popen([sys.executable, "-m", "bench.model", "--out", str(out)], **common)
    variants = subprocess.Popen([sys.executable, "-m", "bench.model", "--variants", "--no-cases", "--json"], **common)
    v_out, v_err = variants.communicate(timeout=900)
    _, c_err = cases.communicate(timeout=900)
    assert cases.returncode == 0, c_err[-4000:]
    assert variants.returncode == 0, v_err[-4000:]
    rep = json.loads(out.read_text())
    rep["variants"] = json.loads(v_out)["variants"]
    return rep


def _launches(report):
    return [(rec["case"], lch) for rec in report["cases"] for lch in rec["launches"]]


def test_every_kernel_is_compiled(report):
    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        defined |= set(re.findall(r"^def (_\w+_kernel)\(", path.read_text(), re.M))
    compiled = {lch["kernel"] for _, lch in _launches(report)} | {v["kernel"] for v in report["variants"]}
    assert compiled == defined, f"never launched by a case or a variant (bench/model/variants.py): {defined - compiled}"


def test_no_spills_and_shared_memory_fits(report):
    spilled, other = set(), []
    entries = [(f"{case}: {lch['kernel']}", lch) for case, lch in _launches(report)]
    entries += [(f"{v['kernel']} ({'; '.join(v['variants'])})", v) for v in report["variants"]]
    for where, entry in entries:
        for problem in checks.arch_problems(where, entry):
            arch = int(re.search(r"sm_(\d+)", problem).group(1))
            if " spills on " in problem and (entry["kernel"], arch) in KNOWN_SPILLS:
                spilled.add((entry["kernel"], arch))
            else:
                other.append(problem)
    assert not other, "\n".join(other)
    assert spilled == set(KNOWN_SPILLS), f"fixed: remove from KNOWN_SPILLS {set(KNOWN_SPILLS) - spilled}"


def test_row_kernels_stream_with_128_bit_loads(report):
    narrow, seen = {}, set()
    for case, lch in _launches(report):
        hot = lch["hot_loop"]
        # the row engine's streaming loops (the tile engine's combine reads a few fp32 partials a row)
        if hot is None or hot["tensor"] or not hot["loads"] or not (hot["source"] or "").startswith("row"):
            continue
        seen.add(lch["kernel"])
        bad = {k: v for k, v in hot["loads"].items() if not k.endswith(".128")}
        if bad:
            narrow.setdefault(lch["kernel"], []).append(f"{case}: {hot['source']} {bad}")
    assert "_ce_fwd_kernel" in seen and "_softmax_bwd_kernel" in seen
    unknown = {k: v for k, v in narrow.items() if k not in KNOWN_NARROW_LOADS}
    assert not unknown, unknown
    assert set(narrow) == set(KNOWN_NARROW_LOADS), \
        f"fixed: remove from KNOWN_NARROW_LOADS {set(KNOWN_NARROW_LOADS) - set(narrow)}"


def test_every_loop_is_counted(report):
    notes = [f"{case}: {lch['kernel']}: {n}" for case, lch in _launches(report) for n in lch["notes"]]
    assert not notes, "\n".join(notes)
    for case, lch in _launches(report):  # each launch's loops ran their source loop's trip count
        # (a launch without a loop in its SASS, e.g. the combine of a split row, has no hot loop)
        assert lch["loop_trips"] or lch["hot_loop"] is None, (case, lch["kernel"])
        assert all(t >= 1 for t in lch["loop_trips"].values()), (case, lch["kernel"])


def test_no_case_moved_from_the_committed_table(report):
    table = M.latest_table()
    assert table is not None, "no bench/results/model-*.json: run python -m bench.model and commit it"
    baseline = json.loads(table.read_text())
    ours, theirs = report["environment"]["triton"], baseline["environment"]["triton"]
    if ours.split(".")[:2] != theirs.split(".")[:2]:
        pytest.skip(f"{table.name} was made with Triton {theirs}, this is {ours}: another compiler, another table")
    assert {r["case"] for r in baseline["cases"]} == {r["case"] for r in report["cases"]}, \
        "the model's cases changed: commit the new table (python -m bench.model)"
    moved = checks.regressions(report, baseline)
    assert not moved, f"against {table.name}:\n" + "\n".join(moved)


def test_the_regression_check_fires(report):
    baseline = copy.deepcopy(report)
    slower, faster, within = (baseline["cases"][i] for i in range(3))
    slower["predicted_ms"]["h100"] /= 1.2  # today's prediction is 20% over it
    faster["predicted_ms"]["h200"] *= 1.2
    within["predicted_ms"]["h100"] /= 1.05
    moved = checks.regressions(report, baseline)
    assert len(moved) == 2
    assert slower["case"] in moved[0] and "slower" in moved[0] and "h100" in moved[0]
    assert faster["case"] in moved[1] and "faster" in moved[1] and "commit the new table" in moved[1]


def test_cross_entropy_forward_is_read_from_its_loop(report):
    """The forward's hot loop: its source loop, 16 iterations of a 2048 block (row_engine.ROW_CONFIGS "stream") at
    C = 32000, two 128-bit loads and one exp (MUFU.EX2) and one reciprocal per element, and a time its issue
    rate bounds."""
    rec = next(r for r in report["cases"] if r["case"] == "cross_entropy-fwd-8192x32000-bfloat16")
    # (beside it, ce_reduce's one-program launch: the loss's sum and the targets' check)
    (lch,) = [lch for lch in rec["launches"] if lch["kernel"] == "_ce_fwd_kernel"]
    hot = lch["hot_loop"]
    assert hot["source"].startswith("row_ce.py:") and hot["trips"] == 16 and hot["step"] == 2048
    assert hot["loads"] == {"LDG.128": 2} and hot["elements_per_thread"] == 16
    assert 10 < hot["instructions_per_element"] < 60 and hot["mufu_per_element"] >= 1
    assert lch["programs"] == 8192 and lch["dram_bytes"] >= 8192 * 32000 * 2
    assert set(lch["reads"]) >= {"x_ptr", "target_ptr", "tau_ptr"} and "loss_ptr" in lch["writes"]
    terms = lch["terms_us"]["h100"]
    assert lch["limit"]["h100"] == max(terms, key=terms.get)


# ----------------------------------------------------------------------------- the parts, without compiling

SASS = """
\t//## File "/x/kernels/k.py", line 10
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_3:
\t//## File "/x/kernels/k.py", line 12
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   MUFU.RCP R5, R6 ;
        /*0040*/              @!P1 BRA `(.L_x_2) ;
        /*0050*/                   MOV R59, 0x70 ;
        /*0060*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
.L_x_2:
        /*0070*/                   FFMA R1, R2, R3, R4 ;
        /*0080*/                   LDG.E.U16 R7, desc[UR4][R2.64] ;
        /*0090*/              @!P2 BRA `(.L_x_3) ;
.L_x_0:
        /*00a0*/                   STG.E R1, desc[UR4][R8.64] ;
        /*00b0*/                   EXIT ;
$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:
        /*00c0*/                   FADD R1, R1, R1 ;
        /*00d0*/                   RET.REL.NODEC R20 `(_k) ;
"""


def test_sass_loops_cold_paths_and_widths():
    instrs, labels, subroutines = sass.parse_sass(SASS)
    assert subroutines == [0xC0] and labels[".L_x_3"] == 0x20
    loops = sass_loops._find_loops(instrs, labels, 0xC0)
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x90)]
    # the slow path (a call, skipped by a forward branch) is cold; the branch around the whole loop is not
    assert sass_loops._cold_addresses(instrs, labels, 0xC0) == {0x50, 0x60}
    assert instrs[2].loc == ("/x/kernels/k.py", 12)
    assert [sass.load_width(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "LDGSTS.E.BYPASS.128")] \
        == [16, 8, 4, 2, 16]
    assert sass.tensor_op("HGMMA.64x32x16.F32.BF16") == ("HGMMA", 64, 32, 16, "BF16", 4)
    assert sass.tensor_op("HMMA.16816.F32.BF16")[1:4] == (16, 8, 16)
    # what a wgmma reads from shared memory: B, and A unless a register holds it
    assert sass.shared_operand_bytes("HGMMA.64x128x16.F32.BF16", "R24, gdesc[UR8], R24") == (128 + 64) * 16 * 2
    assert sass.shared_operand_bytes("HGMMA.64x32x16.F32.BF16", "R24, R40, gdesc[UR16], RZ, !UPT") == 32 * 16 * 2
    assert sass.shared_operand_bytes("HMMA.16816.F32.BF16", "R4, R8, R12, R4") == 0
    assert [sass.shared_width(op) for op in ("LDSM.16.M88.4", "LDSM.16.M88.2", "LDS.128", "STS.64", "LDS")] \
        == [16, 8, 16, 8, 4]


def test_loops_of_the_gpu_ir_carry_their_call_chain():
    ttgir = """
    %s = scf.for %n0 = %c0 to %K step %c64 iter_args(%m = %c) -> (f32) : i32 {
      %acc = scf.for %d0 = %c0 to %D step %c64 iter_args(%a = %c) -> (f32) : i32 {
        scf.yield %a : f32
      } loc(#loc3)
      scf.yield %m : f32
    } loc(#loc4)
#loc1 = loc("/x/kernels/tile.py":76:5)
#loc2 = loc("/x/kernels/tile.py":164:13)
#loc3 = loc(callsite(#loc5 at #loc2))
#loc5 = loc("acc"(#loc1))
#loc4 = loc("/x/kernels/tile.py":162:5)
"""
    assert sass.ir_loops(ttgir) == [(0, [("/x/kernels/tile.py", 162)]),
                                    (1, [("/x/kernels/tile.py", 76), ("/x/kernels/tile.py", 164)])]


def test_pointer_access_follows_pointers_not_values():
    ttir = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"), %y_ptr: !tt.ptr<i64> loc("y_ptr"), %out_ptr: !tt.ptr<f32> loc("out_ptr")) attributes {noinline = false} {
    %0 = tt.addptr %y_ptr, %r : !tt.ptr<i64>, i64 loc(#loc1)
    %y = tt.load %0 : !tt.ptr<i64> loc(#loc2)
    %1 = tt.addptr %x_ptr, %y : !tt.ptr<bf16>, i64 loc(#loc3)
    %x = tt.load %1 : !tt.ptr<bf16> loc(#loc4)
    %2 = tt.addptr %out_ptr, %y : !tt.ptr<f32>, i64 loc(#loc5)
    tt.store %2, %x : !tt.ptr<f32> loc(#loc6)
"""
    assert sass.pointer_access(ttir) == ({"x_ptr", "y_ptr"}, {"out_ptr"})


def test_pointer_access_ignores_an_offset_named_as_a_pointer_elsewhere():
    """Sibling regions (two loops) may reuse an SSA name: %o is a pointer in the first loop and an integer
    offset in the second; only addptr's base carries an origin."""
    ttir = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"), %dx_ptr: !tt.ptr<bf16> loc("dx_ptr")) attributes {noinline = false} {
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (f32)  : i32 {
      %o = tt.addptr %x_ptr, %i : !tt.ptr<bf16>, i32 loc(#loc1)
      %v = tt.load %o : !tt.ptr<bf16> loc(#loc2)
    }
    %1 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (f32)  : i32 {
      %o = arith.extsi %i : i32 to i64 loc(#loc3)
      %p = tt.addptr %dx_ptr, %o : !tt.ptr<bf16>, i64 loc(#loc4)
      tt.store %p, %v : !tt.ptr<bf16> loc(#loc5)
    }
"""
    assert sass.pointer_access(ttir) == ({"x_ptr"}, {"dx_ptr"})


def test_pointer_access_forgets_a_regions_names_when_it_ends():
    """A loop's body and a later if's reuse SSA names: %26 is a splat of the logits' pointer in the loop and
    the address of a statistic stored in the if; the store writes s_ptr only (it made the model count a
    logits-sized write, cross_entropy's forward at twice its bytes).  An op's results outlive its region."""
    ttir = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"), %s_ptr: !tt.ptr<f32> loc("s_ptr")) attributes {noinline = false} {
    %2 = tt.addptr %x_ptr, %r : !tt.ptr<bf16>, i64 loc(#loc1)
    %m:2 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z, %q = %2) -> (f32, !tt.ptr<bf16>)  : i32 {
      %26 = tt.splat %q : !tt.ptr<bf16> -> tensor<2048x!tt.ptr<bf16>> loc(#loc2)
      %27 = tt.addptr %26, %c : tensor<2048x!tt.ptr<bf16>>, tensor<2048xi32> loc(#loc3)
      %28 = tt.load %27 : tensor<2048x!tt.ptr<bf16>> loc(#loc4)
      scf.yield %a, %q : f32, !tt.ptr<bf16> loc(#loc5)
    } loc(#loc6)
    scf.if %last {
      %26 = tt.addptr %s_ptr, %r : !tt.ptr<f32>, i64 loc(#loc7)
      tt.store %26, %S : !tt.ptr<f32> loc(#loc8)
    } else {
      %w = tt.load %m#1 : !tt.ptr<bf16> loc(#loc9)
    } loc(#loc10)
"""
    assert sass.pointer_access(ttir) == ({"x_ptr"}, {"s_ptr"})


def test_second_reads_come_from_dram_when_the_rows_in_flight_overflow_l2():
    dev = R.H100
    row = 64_000  # bytes a program reads, twice
    fits = 132 * 2  # programs in flight: 264 x 64 kB = 17 MB, within 50 MB
    assert R.reread_dram_bytes(dev, 8192, 2, 8192 * row, 2 * 8192 * row) == 0.0
    assert R.reread_dram_bytes(dev, 8192, 2, 8192 * row, 8192 * row) == 0.0  # read once: nothing again
    big = 4 * row * 10  # 264 x 2.56 MB = 676 MB in flight: L2 holds 50 / 676 of the second reads
    again = R.reread_dram_bytes(dev, 8192, 2, 8192 * big, 2 * 8192 * big)
    assert again == pytest.approx(8192 * big * (1 - dev.l2_capacity_bytes / (fits * big)))


def test_roofline_terms_and_the_busy_share():
    dev = R.H100
    assert R.busy_share(132, dev) == 1.0 and R.busy_share(66, dev) == 0.5
    assert R.busy_share(133, dev) == pytest.approx(133 / 264)
    counts = sass.Counts(instructions=1000, mufu=10, load_bytes=1000, tensor_flops={})
    t, limit, terms = R.kernel_time(dev, 132 * 100, 8, counts, dram_bytes=10e9)
    assert limit == "dram" and t == pytest.approx(10e9 / dev.dram_bytes_s)
    counts.instructions = 1e6
    t, limit, _ = R.kernel_time(dev, 132, 8, counts, dram_bytes=0)
    assert limit == "issue" and t == pytest.approx(132 * 8 * 1e6 / (132 * 4 * dev.clock_hz))
    assert R.kernel_time(dev, 1, 1, sass.Counts(), 0)[1] == "launch"
    # shared memory's banks: 128 bytes a clock an SM
    t, limit, _ = R.kernel_time(dev, 132, 8, sass.Counts(shared_bytes=1e9), dram_bytes=0)
    assert limit == "shared" and t == pytest.approx(1e9 / (128 * dev.clock_hz))
    assert R.resident_blocks(90, 8, 64, 48 * 1024) == 4  # 64 regs: 4 blocks of 256 threads; smem 49 KiB: 4
    assert R.resident_blocks(90, 8, 90, 0) == 2  # 96 regs a thread (rounded to 8) x 256 threads: 2 blocks


def test_loop_bounds_through_the_kernels_own_assignments(tmp_path):
    """A split's column loop, range(col0, col_end, BLOCK_N) with col0 from tl.program_id and col_end a
    tl.minimum, is counted for the first program (what every program but a ragged last one walks)."""
    src = tmp_path / "k.py"
    src.write_text("def _k(K, split_cols, BLOCK_N):\n"
                   "    col0 = tl.program_id(1) * split_cols\n"
                   "    col_end = tl.minimum(K, col0 + split_cols)\n"
                   "    for n0 in range(col0, col_end, BLOCK_N):\n"
                   "        pass\n")
    (f,) = sass.source_fors(str(src))

    class Loop:
        for_stmt, chain = f, [(str(src), 4)]

    args = dict(K=1000, split_cols=256, BLOCK_N=64)
    assert sass.trip_count(Loop, args, "_k", [str(tmp_path)]) == (4, 64)
    assert sass.trip_count(Loop, dict(args, K=100), "_k", [str(tmp_path)]) == (2, 64)


def test_latency_bounds_a_launch_with_too_few_loads_in_flight():
    """Little's law (issue 15 item 6): resident warps · 32 · bytes a thread keeps in flight, over DRAM's
    latency, caps the rate a launch reads DRAM at; a launch above it is "latency"-bound."""
    dev = R.H200
    # 64 x 256000 bf16 read by 256 4-warp programs of 32 bytes a thread (cross-entropy's split forward
    # before issue 15 item 6): 1 MB in flight, 18.8 us at 600 ns against 7.6 us at the H200's bandwidth
    t = R.latency_seconds(dev, 256, 4, 6, 32, 64 * 256000 * 2)
    assert t == pytest.approx(64 * 256000 * 2 * dev.dram_latency_s / (256 * 4 * 32 * 32))
    counts = sass.Counts(instructions=10, load_bytes=32 * 16)
    secs, limit, terms = R.kernel_time(dev, 256, 4, counts, 64 * 256000 * 2, t)
    assert limit == "latency" and secs == t and terms["dram"] < t
    # more resident warps than the grid has: only the grid's programs count; small reads are left out
    assert R.latency_seconds(dev, 10, 4, 6, 32, 10 << 20) == pytest.approx(10 * 2 ** 20 * 600e-9 / (10 * 4 * 32 * 32))
    assert R.latency_seconds(dev, 256, 4, 6, 32, R.LATENCY_MIN_BYTES - 1) == 0.0
    # a thread's bytes in flight: one iteration of the hot loop's loads, cp.async copies num_stages - 1 ahead
    hot = dict(loads={"LDG.128": 2, "LDGSTS.128": 4})
    assert M.inflight_bytes(hot, sass.Counts(load_bytes=999), 3) == 2 * 16 + 4 * 16 * 2
    assert M.inflight_bytes(None, sass.Counts(load_bytes=48), 3) == 48


ELECTED_SASS = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   ATOMG.E.ADD.STRONG.GPU PT, R8, desc[UR4][R6.64], R3 ;
        /*0020*/                   ISETP.NE.U32.AND P4, PT, R8, UR5, PT ;
        /*0030*/               @P4 EXIT ;
        /*0040*/                   LDG.E R9, desc[UR4][R10.64] ;
        /*0050*/                   FADD R9, R9, R4 ;
        /*0060*/                   STG.E desc[UR4][R12.64], R9 ;
        /*0070*/                   EXIT ;
"""


def test_a_tickets_elected_region_is_not_counted_for_every_program():
    """The code after a ticket (ATOMG returning its old value) that every program but the last arriver
    leaves by a predicated EXIT runs in one program of a row's splits: counted zero times a program."""
    instrs, labels, _ = sass.parse_sass(ELECTED_SASS)
    assert sass_loops._elected_addresses(instrs, labels, 0x80) == {0x40, 0x50, 0x60, 0x70}
    # an atomic whose old value is not used elects nobody
    no_ticket = ELECTED_SASS.replace("PT, R8,", "PT, RZ,").replace("R8, UR5", "RZ, UR5")
    instrs, labels, _ = sass.parse_sass(no_ticket)
    assert sass_loops._elected_addresses(instrs, labels, 0x80) == set()


def test_few_long_rows_keep_enough_loads_in_flight():
    """row_engine.row_splits: 64 rows of 256000 bf16 on 132 SMs take enough split programs that their blocks
    hold INFLIGHT_BYTES (2 programs an SM held 1 MB); the cap keeps at most MAX_PROGRAMS_PER_SM an SM, many
    rows are not split."""
    import fused_tau.kernels.row_engine as row
    import fused_tau.kernels.tile_engine as tile_engine

    saved = tile_engine.SM_COUNT_OFF_GPU
    tile_engine.SM_COUNT_OFF_GPU = 132
    try:
        cpu = torch.device("cpu")
        splits, span = row.row_splits(64, 256000, 4096, cpu, 2048 * 2)
        want = -(-row.INFLIGHT_BYTES // (2048 * 2)) // 64  # 12 splits of 4 kB blocks: 3 MB in flight
        assert want - 1 <= splits <= want  # (less one where whole blocks a span round the count down)
        assert splits * 64 <= row.MAX_PROGRAMS_PER_SM * 132
        assert splits * span >= 256000 > (splits - 1) * span
        assert row.row_splits(64, 256000, 4096, cpu)[0] == 132 * row.PROGRAMS_PER_SM // 64  # without the bytes
        assert row.row_splits(8192, 32000, 4096, cpu, 8192)[0] == 1
    finally:
        tile_engine.SM_COUNT_OFF_GPU = saved


def test_a_subset_of_ops_leaves_the_committed_table_alone():
    """`python -m bench.model --ops X` (no --out) used to overwrite the committed table with X's rows alone."""
    table = M.latest_table()
    before = table.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "bench.model", "--ops", "sample"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not rewritten" in proc.stderr and "sample-fwd" in proc.stdout
    assert table.read_bytes() == before
