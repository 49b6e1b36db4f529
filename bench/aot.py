"""Ahead-of-time compile of every kernel config for sm_80 and sm_90, without a GPU.

    python -m bench.aot            # table of registers, spills (local memory) and shared memory
    python -m bench.aot --json     # the same as JSON (tests/test_aot.py reads it)

Each config is compiled with ``triton.compile(..., target=GPUTarget("cuda", cap, 32))``
and its cubin read with ``cuobjdump --dump-resource-usage`` (shipped in Triton's
nvidia backend).  A config passes when it spills nothing (STACK and LOCAL are 0:
ptxas puts spilled registers in the stack frame) and its shared memory (static,
from cuobjdump, plus the dynamic shared memory Triton launches it with, from the
kernel's metadata) fits the architecture's per-block limit.  Must run without
TRITON_INTERPRET=1.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory a block may use (A100, H100)


def _row_configs():
    from fused_tau.kernels import row_ce, row_engine, row_kd, row_sample, row_softmax, tile

    block = row_engine.MAX_BLOCK
    _, _, warps = row_engine.row_config(block)
    small = 1024
    _, _, small_warps = row_engine.row_config(small)
    # the JIT specialises unit strides and B == 1 (dim=-1): compile the common case that way
    unit = dict(B=1, stride_xc=1)
    yield "softmax_fwd", row_softmax._softmax_fwd_kernel, warps, dict(
        MODE=[0, 1, 2], ONE_BLOCK=[False], BLOCK=[block], **{k: [v] for k, v in unit.items()})
    yield "softmax_fwd", row_softmax._softmax_fwd_kernel, small_warps, dict(
        MODE=[1, 2], ONE_BLOCK=[True], BLOCK=[small], **{k: [v] for k, v in unit.items()})
    yield "softmax_bwd", row_softmax._softmax_bwd_kernel, warps, dict(
        LOG=[False, True], TAU_GRAD=[False, True], ONE_BLOCK=[False], BLOCK=[block], B=[1], stride_xc=[1])
    yield "softmax_bwd", row_softmax._softmax_bwd_kernel, small_warps, dict(
        LOG=[False, True], TAU_GRAD=[True], ONE_BLOCK=[True], BLOCK=[small], B=[1], stride_xc=[1])
    yield "lse_bwd", row_softmax._lse_bwd_kernel, warps, dict(TAU_GRAD=[False, True], BLOCK=[block], B=[1], stride_xc=[1])
    ce_flags = [dict(HAS_WEIGHT=False, PROB_TARGET=False, SMOOTH=False),
                dict(HAS_WEIGHT=True, PROB_TARGET=False, SMOOTH=True),
                dict(HAS_WEIGHT=True, PROB_TARGET=True, SMOOTH=True)]
    for flags in ce_flags:
        yield "ce_fwd", row_ce._ce_fwd_kernel, warps, dict(
            BLOCK=[block], B=[1], stride_xc=[1], **{k: [v] for k, v in flags.items()})
        yield "ce_bwd", row_ce._ce_bwd_kernel, warps, dict(
            BLOCK=[block], B=[1], stride_xc=[1], stride_dc=[1], TAU_GRAD=[True],
            **{k: [v] for k, v in flags.items()})
    kd_block, kd_warps = row_engine.row_config(1 << 20, row_kd.LANES_PER_BLOCK)[0], row_kd.NUM_WARPS
    yield "kd_fwd", row_kd._kd_fwd_kernel, kd_warps, dict(
        BLOCK=[kd_block], HAS_TARGET=[False, True], ELEMENTWISE=[False, True])
    yield "kd_bwd", row_kd._kd_bwd_kernel, kd_warps, dict(
        BLOCK=[kd_block], HAS_TARGET=[True], ELEMENTWISE=[False], TEACHER_GRAD=[True], TAU_GRAD=[True])
    yield "kd_bwd", row_kd._kd_bwd_kernel, kd_warps, dict(
        BLOCK=[kd_block], HAS_TARGET=[False], ELEMENTWISE=[True], TEACHER_GRAD=[True], TAU_GRAD=[True])
    yield from row_sample.aot_configs()
    # tile engine at its default tiles; D = 128 (MoCo) puts all of D in one BLOCK_DO program; one τ
    # (TAU_PER_ROW=False, the common case) and, for the forward, one per row
    tiles = dict(BLOCK_M=[tile.BLOCK_M], BLOCK_N=[tile.BLOCK_N], BLOCK_D=[tile.BLOCK_D], UPCAST=[False],
                 stride_ad=[1], stride_bd=[1])
    per_dtype = {dt: dict(zip(("BLOCK_D", "BLOCK_DO"), tile.blocks(dt))) for dt in ("bf16", "fp16", "fp32")}
    fwd_per_dtype = {dt: {"BLOCK_D": v["BLOCK_D"]} for dt, v in per_dtype.items()}
    yield "tile_fwd", tile._tile_fwd_kernel, tile.NUM_WARPS, dict(
        HAS_BIAS=[False, True], HAS_TARGET=[True], MASK_DIAG=[False, True], TAU_PER_ROW=[False, True],
        PRECISION=["tf32"], **tiles), fwd_per_dtype
    yield "tile_combine", tile._tile_combine_kernel, 4, dict(
        HAS_TARGET=[False, True], TAU_PER_ROW=[False, True], BLOCK=[tile.COMBINE_BLOCK])
    for kernel, name, extra in ((tile._tile_bwd_da_kernel, "tile_bwd_da", dict(NEED_ZP=[True])),
                                (tile._tile_bwd_db_kernel, "tile_bwd_db", {})):
        yield name, kernel, tile.NUM_WARPS, dict(HAS_BIAS=[True], HAS_TARGET=[True], MASK_DIAG=[True],
                                                 TAU_PER_ROW=[False, True], PRECISION=["tf32"],
                                                 BLOCK_DO=[tile.BLOCK_DO], **extra, **tiles), per_dtype
    yield "tile_bwd_probs", tile._tile_bwd_probs_kernel, tile.NUM_WARPS, dict(
        HAS_BIAS=[True], HAS_TARGET=[True], MASK_DIAG=[True], NEED_ZP=[True], TAU_PER_ROW=[False],
        PRECISION=["tf32"], **tiles), fwd_per_dtype


# pointers that hold logits (or their gradients) in the input dtype; the rest are fp32 / int64
LOGIT_POINTERS = {
    "kd": ("s_ptr", "t_ptr", "ds_ptr", "dt_ptr", "out_ptr"),
    "tile": ("a_ptr", "b_ptr", "bias_ptr", "ds_ptr"),
    "": ("x_ptr", "out_ptr", "y_ptr", "g_ptr", "dx_ptr"),
}


def _pointer_type(kernel, name, dtype):
    family = "kd" if kernel.startswith("kd_") else "tile" if kernel.startswith("tile_") else ""
    if name in LOGIT_POINTERS[family]:
        return "*" + dtype
    if name in ("target_ptr", "seed_ptr", "idx_ptr"):
        return "*i64"
    return "*fp32"


def _signature(kernel, fn, dtype, constants):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _pointer_type(kernel, name, dtype)
        elif name == "smoothing":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _nvidia_bin(tool):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _cuobjdump():
    return _nvidia_bin("cuobjdump")


def _spill_bytes(ptx, cap):
    """Spill stores + loads that ptxas reports for the kernel's PTX (``ptxas -v``): the definitive
    spill count (cuobjdump's STACK also holds call frames, which are not spills)."""
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the PTX version Triton emits needs its newest bundled ptxas (ptxas-blackwell in Triton 3.9)
        for tool in ("ptxas-blackwell", "ptxas"):
            if not os.path.exists(_nvidia_bin(tool)):
                continue
            out = subprocess.run([_nvidia_bin(tool), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                break
        else:
            raise RuntimeError(f"no bundled ptxas assembles the kernel:\n{out.stderr}")
    stores = re.findall(r"(\d+) bytes spill stores", out.stderr + out.stdout)
    loads = re.findall(r"(\d+) bytes spill loads", out.stderr + out.stdout)
    if not stores or not loads:
        raise RuntimeError(f"ptxas -v printed no spill counts:\n{out.stderr}")
    return sum(map(int, stores)) + sum(map(int, loads))


def _resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_all(dtypes=("bf16", "fp32"), caps=(80, 90)):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run bench.aot without TRITON_INTERPRET=1: the interpreter has no compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    records = []
    for name, fn, warps, grid, *per_dtype in _row_configs():
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            for dtype, cap in itertools.product(dtypes, caps):
                constants = dict(zip(keys, values))
                if "INTERPRETED" in fn.arg_names:
                    constants["INTERPRETED"] = False
                if per_dtype:  # constants the launcher picks by dtype (e.g. the tile engine's D-steps)
                    constants.update(per_dtype[0].get(dtype, {}))
                src = ASTSource(fn=fn, signature=_signature(name, fn, dtype, constants), constexprs=constants)
                kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
                res = _resources(kernel.asm["cubin"])
                res["shared"] = res.get("shared", 0) + int(kernel.metadata.shared)
                res["spill"] = _spill_bytes(kernel.asm["ptx"], cap)
                res.update(kernel=name, dtype=dtype, sm=cap, num_warps=warps,
                           config={k: v for k, v in constants.items() if k not in ("INTERPRETED",)},
                           shared_limit=SHARED_LIMIT[cap])
                res["ok"] = res["spill"] == 0 and res.get("local", 0) == 0 and res["shared"] <= SHARED_LIMIT[cap]
                records.append(res)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON records")
    args = parser.parse_args(argv)
    records = compile_all()
    if args.json:
        json.dump(records, sys.stdout)
        return 0 if all(r["ok"] for r in records) else 1
    print(f"{'kernel':12} {'dtype':5} {'sm':3} {'warps':5} {'reg':>4} {'spill':>5} {'stack':>5} {'shared':>7}  config")
    for r in records:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items() if k.isupper())
        flag = "" if r["ok"] else "  <-- FAILS"
        print(f"{r['kernel']:12} {r['dtype']:5} {r['sm']:3} {r['num_warps']:5} {r['reg']:4} {r['spill']:5} {r['stack']:5} "
              f"{r['shared']:7}  {cfg}{flag}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
