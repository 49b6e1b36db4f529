"""The row engine's launch table (kernels/row_engine.py ROW_CONFIGS, looked up by row_launch): an entry for
every pass kind on sm_80 and sm_90, the values the performance model was run with, and every row kernel
launched with what the lookup gives (a launcher that chose its own block, warps or stages fails here)."""
import pytest
import torch

import fused_tau
from fused_tau._dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CPU = torch.device("cpu")


def test_every_kind_has_an_entry_per_architecture():
    from fused_tau.kernels import row_engine

    assert {kind for _, kind in row_engine.ROW_CONFIGS} == set(row_engine.ROW_KINDS)
    for kind in row_engine.ROW_KINDS:
        for arch in (80, 90):
            entry = row_engine.ROW_CONFIGS[(arch, kind)]
            assert {"max_block", "warps", "num_stages"} <= set(entry), (arch, kind)


def test_the_architecture_picks_the_entry(monkeypatch):
    """sm_80 (and what lies below sm_90) reads the sm_80 entries, sm_90 and above the sm_90 ones."""
    from fused_tau.kernels import row_engine, tile_engine

    monkeypatch.setitem(row_engine.ROW_CONFIGS, (80, "row"), dict(row_engine.ROW_CONFIGS[(80, "row")], num_stages=1))
    for arch, stages in ((90, 3), (100, 3), (80, 1), (86, 1)):
        monkeypatch.setattr(tile_engine, "ARCH_OFF_GPU", arch)
        assert row_engine.row_launch("row", 32000, CPU).num_stages == stages, arch


def test_the_gpu_values(monkeypatch):
    """The blocks and warps the model's table (bench/results/model-2026-12-01.md) was predicted with."""
    from fused_tau.kernels import row_engine, tile_engine

    monkeypatch.setattr(row_engine, "MAX_BLOCK", 4096)
    monkeypatch.setattr(tile_engine, "SM_COUNT_OFF_GPU", 132)
    monkeypatch.setattr(row_engine, "L2_BYTES_OFF_GPU", 50_000_000)

    def launch(kind, C, col_bytes=0):
        cfg = row_engine.row_launch(kind, C, CPU, col_bytes)
        return cfg.block, cfg.num_warps, cfg.num_stages

    for arch in (80, 90):
        monkeypatch.setattr(tile_engine, "ARCH_OFF_GPU", arch)
        assert launch("row", 32000) == (4096, 8, 3)
        assert launch("row", 1000) == (1024, 4, 3) and row_engine.row_launch("row", 1000, CPU).one_block
        assert launch("noisy", 256000) == (4096, 16, 3)
        assert launch("stream", 32000) == (2048, 4, 3)
        assert launch("stream", 1000) == (1024, 4, 3)
        assert launch("stream_split_sums", 256000) == (1024, 4, 3)
        assert launch("reread", 32000, 2) == (4096, 8, 3)  # 528 rows of 64 kB fit the L2
        assert launch("reread", 128256, 2) == (8192, 32, 3)
        assert launch("reread_sums", 128256, 2) == (4096, 32, 3)
        assert launch("reread", 32000, 4) == (8192, 32, 3)  # softmax_bwd, y and g in bf16: 68 MB
        kd = row_engine.row_launch("kd_fwd", 128256, CPU)
        assert (kd.block, kd.lanes, kd.chunk, kd.num_warps) == (2048, 128, 8, 4)
        kd = row_engine.row_launch("kd_bwd", 128256, CPU)
        assert (kd.block, kd.num_warps) == (1024, 4)


ROW_KERNELS = {"_ce_fwd_kernel", "_ce_bwd_kernel", "_softmax_fwd_kernel", "_softmax_bwd_kernel", "_lse_bwd_kernel",
               "_sample_kernel", "_argmax_kernel", "_kd_fwd_kernel", "_kd_bwd_kernel"}


def test_every_launch_takes_the_table(monkeypatch):
    """Each kind's entry (and its long one) gets its own num_stages, a mark no launcher could choose itself:
    every row kernel's launch must carry one, with the block and warps row_launch gives that kind, and every
    kind must be launched by some op."""
    import triton.runtime.interpreter as interpreter

    from fused_tau.kernels import row_engine, tile_engine

    monkeypatch.setenv("FUSED_TAU_BACKEND", "triton")
    monkeypatch.setattr(row_engine, "MAX_BLOCK", 16)
    monkeypatch.setattr(row_engine, "MIN_BLOCKS_PER_SPLIT", 1)
    monkeypatch.setattr(row_engine, "L2_BYTES_OFF_GPU", 0)  # reread's long entry on rows past a block
    monkeypatch.setattr(tile_engine, "SM_COUNT_OFF_GPU", 16)
    mark = {}
    for (arch, kind), entry in list(row_engine.ROW_CONFIGS.items()):
        marked = dict(entry, num_stages=100 + 2 * row_engine.ROW_KINDS.index(kind))
        if "long" in entry:
            marked["long"] = dict(entry["long"], num_stages=marked["num_stages"] + 1)
        monkeypatch.setitem(row_engine.ROW_CONFIGS, (arch, kind), marked)
        mark[marked["num_stages"]] = mark[marked["num_stages"] + 1] = kind

    launches = []
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn.__name__ in ROW_KERNELS:
            launches.append((self.fn.__name__, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)

    def check(C, *col_bytes):
        """The launches so far, each checked against row_launch at C columns; returns their kinds."""
        kinds = set()
        for name, kwargs in launches:
            assert kwargs.get("num_stages") in mark, f"{name} launched without the table's stages"
            kind = mark[kwargs["num_stages"]]
            expect = [row_engine.row_launch(kind, C, CPU, b) for b in col_bytes or (0,)]
            expect = [c for c in expect if c.num_stages == kwargs["num_stages"]]
            assert expect, (name, kind, kwargs["num_stages"])
            cfg = expect[0]
            assert kwargs["num_warps"] == cfg.num_warps, (name, kind)
            assert kwargs["BLOCK"] == cfg.block, (name, kind)
            if "LANES" in kwargs:
                assert (kwargs["LANES"], kwargs["CHUNK"]) == (cfg.lanes, cfg.chunk)
            kinds.add(kind)
        launches.clear()
        return kinds

    seen = set()
    C = 100  # 7 blocks of 16: split over the rows, the last block partial
    x = torch.randn(3, C, requires_grad=True)
    y = torch.tensor([0, 5, C - 1])
    tau = torch.tensor(0.7, requires_grad=True)
    for min_blocks in (1, 1 << 30):  # rows split (forward, then backward), or not (the forward writes dx)
        monkeypatch.setattr(row_engine, "MIN_BLOCKS_PER_SPLIT", min_blocks)
        for opts in (dict(), dict(label_smoothing=0.1)):
            fused_tau.cross_entropy(x, y, tau=tau, **opts).backward()
            with torch.no_grad():
                fused_tau.cross_entropy(x, y, tau=tau, **opts)
            seen |= check(C, x.element_size())
    for fn in (fused_tau.softmax, fused_tau.log_softmax):
        fn(x, -1, tau=tau).sum().backward()  # dτ: "row"
        fn(x, -1, tau=0.7).backward(torch.randn(3, C))  # several blocks, no dτ: "reread"
    fused_tau.logsumexp(x, -1, tau=tau).sum().backward()
    seen |= check(C, 2 * x.element_size())
    gen = torch.Generator().manual_seed(0)
    fused_tau.gumbel_softmax(x, 0.5, hard=True, generator=gen).sum().backward()
    fused_tau.sample(x.detach(), tau=0.8, generator=gen)
    fused_tau.sample(x.detach(), tau=0.0)
    seen |= check(C)
    s, t = torch.randn(3, C, requires_grad=True), torch.randn(3, C)
    fused_tau.kd_loss(s, t, tau=2.0, target=y).backward()
    seen |= check(C)
    assert seen == set(row_engine.ROW_KINDS)
