"""The tile engine's grid (kernels/tile_engine.py split_plan, issue 14 item 1): the long dimension split
across programs whatever N (flash-decoding), the splits' partials merged deterministically, and τ passed as
one element or one per row, never expanded (issue 17)."""
import math

import pytest
import torch
import triton

import fused_tau
import fused_tau._ops as ops
from fused_tau import reference

from .compare import check_against_reference

pytest.importorskip("triton")


# ---------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("programs, tiles, sms", [(4, 1024, 132), (64, 1024, 132), (128, 2004, 132), (1, 1, 132),
                                                  (3, 7, 4), (2, 3, 16), (5, 0, 8), (200, 5, 132), (4, 1024, 108)])
def test_split_plan_covers_every_tile_once(programs, tiles, sms):
    import fused_tau.kernels.tile_engine as tile_engine

    splits, per = tile_engine.split_plan(programs, tiles, sms)
    assert splits >= 1
    if tiles == 0:
        return
    assert per >= min(tile_engine.MIN_TILES_PER_SPLIT, tiles)
    assert splits * per >= tiles and (splits - 1) * per < tiles  # every tile in one split, no empty split
    assert tile_engine.split_plan(programs, tiles, sms, max_splits=2)[0] <= 2


class _Launches:
    """Stands in for the tile kernels: records each launch's grid, launches nothing."""

    def __init__(self):
        self.grids = {}

    def kernel(self, name):
        launches = self

        class _Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.grids[name] = tuple(grid)
                return launch
        return _Kernel()


@pytest.mark.parametrize("N", [256, 4096])
def test_grid_fills_the_gpu_at_moco_shapes(monkeypatch, N):
    """MoCo, K = 65536 keys, D = 128, bf16, on 132 SMs: the forward and the backward's da kernel
    launched one program per 64 queries (4 programs at N = 256, 64 at N = 4096); now at least 90% of
    the SMs get one."""
    import fused_tau.kernels.tile_bwd as tile_bwd
    import fused_tau.kernels.tile_engine as tile_engine
    import fused_tau.kernels.tile_fwd as tile_fwd

    launches = _Launches()
    for module, name in ((tile_fwd, "_tile_fwd_kernel"), (tile_fwd, "_tile_combine_kernel"),
                         (tile_bwd, "_tile_bwd_da_kernel"), (tile_bwd, "_tile_bwd_db_kernel")):
        monkeypatch.setattr(module, name, launches.kernel(name))
    monkeypatch.setattr(tile_engine, "sm_count", lambda device: 132)
    K, D = 65536, 128
    q = torch.empty(N, D, dtype=torch.bfloat16)
    queue = torch.empty(K, D, dtype=torch.bfloat16)
    tau = torch.full((1,), 0.2)
    ops.tile_fwd("triton", q, queue, None, tau, None, None, q)
    stats = torch.zeros(N)
    ops.tile_bwd("triton", q, queue, None, tau, None, None, stats, stats, stats, True, False, True)
    for name in ("_tile_fwd_kernel", "_tile_bwd_da_kernel"):
        programs = math.prod(launches.grids[name])
        assert 0.9 * 132 <= programs <= 2 * 132, (name, launches.grids[name])
    assert "_tile_combine_kernel" in launches.grids


# ---------------------------------------------------------------------------- splits against the reference

def _forced_plan(per):
    """A split_plan that cuts every long dimension into splits of ``per`` tiles (the last one partial)."""
    def plan(programs, tiles, sms, max_splits=None):
        if tiles <= 0:
            return 1, max(tiles, 0)
        p = min(per, tiles)
        return triton.cdiv(tiles, p), p
    return plan


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("per", [1, 2, 3])
@pytest.mark.parametrize("N, K", [(1, 15), (17, 16), (33, 49), (16, 47)])
@pytest.mark.parametrize("route", ["fused", "materialized"])
def test_every_split_against_the_reference(backend, device, monkeypatch, per, N, K, route):
    """Splits of 1, 2 and 3 sixteen-wide tiles over odd sizes around the tile and split boundaries: MoCo
    with a learnable queue (the forward's and da's column splits, db's row splits), in-batch InfoNCE (the
    target in one split), NT-Xent (the excluded diagonal), linear cross-entropy with a bias (dbias);
    per-row τ and one τ; loss and every gradient against float64."""
    import fused_tau.kernels.tile_bwd as tile_bwd
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setattr(tile_engine, "split_plan", _forced_plan(per))
    monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route)
    D, n = 5, K // 2 + 1

    def tau_rows(rows):
        return (torch.rand(rows, device=device) * 0.3 + 0.1).requires_grad_()

    def tau_one():
        return torch.tensor(0.15, device=device, requires_grad=True)

    q, k, queue = (torch.randn(rows, D, device=device) for rows in (N, N, K))
    check_against_reference(lambda q, k, qu, tau: fused_tau.infonce(q, k, qu, tau=tau, reduction="none"),
                            lambda q, k, qu, tau: reference.infonce(q, k, qu, tau=tau, reduction="none"),
                            [q, k, queue], dtype=torch.float32, tau=tau_rows(N), tau_scale=N)
    a, b = torch.randn(n, D, device=device), torch.randn(n, D, device=device)
    check_against_reference(lambda a, b, tau: fused_tau.infonce(a, b, tau=tau),
                            lambda a, b, tau: reference.infonce(a, b, tau=tau),
                            [a, b], dtype=torch.float32, tau=tau_one(), tau_scale=n)
    check_against_reference(fused_tau.nt_xent, reference.nt_xent, [a, b], dtype=torch.float32, tau=tau_one(),
                            tau_scale=n)
    # CLIP in one pass: the rows' column splits and the columns' row blocks; one τ and one per index
    for n_clip in (n, N):
        a, b = torch.randn(n_clip, D, device=device), torch.randn(n_clip, D, device=device)
        for tau in (tau_one(), tau_rows(n_clip)):
            check_against_reference(fused_tau.clip_loss, reference.clip_loss, [a, b], dtype=torch.float32, tau=tau,
                                    tau_scale=n_clip)
    W, bias = torch.randn(K, D, device=device), torch.randn(K, device=device)
    y = torch.randint(0, K, (N,), device=device)
    check_against_reference(lambda x, W, b, tau: fused_tau.linear_cross_entropy(x, W, y, linear_bias=b, tau=tau),
                            lambda x, W, b, tau: reference.linear_cross_entropy(x, W, y, linear_bias=b, tau=tau),
                            [q, W, bias], dtype=torch.float32, tau=tau_rows(N), tau_scale=N)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_splits_merge_special_rows(backend, device, monkeypatch):
    """Rows whose splits disagree: a +inf logit in one split (NaN loss, as the composition), a -inf
    (masked) split beside finite ones, a row whose every negative is -inf (the positive alone: loss 0),
    and a NaN in one split; every split merged in the combine kernel."""
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setattr(tile_engine, "split_plan", _forced_plan(1))
    D, K = 3, 40
    q = torch.ones(4, D, device=device)
    k = torch.ones(4, D, device=device)
    queue = torch.randn(K, D, device=device)
    queue[:16] = -float("inf")  # the first split: -inf logits only (q > 0)
    q[1, 0] = float("inf")  # +inf logits in every split
    q[2] = torch.tensor([float("nan"), 1.0, 1.0])
    queue_all_masked = torch.full((K, D), -float("inf"), device=device)
    ours = fused_tau.infonce(q, k, queue, tau=0.5, reduction="none")
    ref = reference.infonce(q.double(), k.double(), queue.double(), tau=0.5, reduction="none")
    torch.testing.assert_close(ours.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    alone = fused_tau.infonce(q[3:], k[3:], queue_all_masked, tau=0.5, reduction="none")
    assert alone.item() == 0.0


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_clip_splits_merge_special_entries(backend, device, monkeypatch):
    """CLIP's one pass with 1-tile splits over 40 pairs (16-row blocks).  Columns 16-39 whose first row
    block's partial holds only -inf similarities (1e20 · -1e20 overflows fp32; exp of -1e40 / τ is 0 in
    float64) beside finite blocks, and rows 0-15 whose other splits are all -inf: loss and every
    gradient against the float64 composition.  Then a +inf similarity and a NaN feature: the loss, τ's
    gradient and every input gradient NaN, as the composition's (a NaN row reaches every column)."""
    import fused_tau.kernels.tile_engine as tile_engine

    monkeypatch.setattr(tile_engine, "split_plan", _forced_plan(1))
    N, D = 40, 3
    a, b = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    a[:16, 0], b[16:, 0], b[:16, 0] = 1e20, -1e20, 1e-19
    a[16:, 0] = 0.0
    for tau in (torch.tensor(0.3, device=device, requires_grad=True),
                (torch.rand(N, device=device) * 0.3 + 0.1).requires_grad_()):
        check_against_reference(fused_tau.clip_loss, reference.clip_loss, [a, b], dtype=torch.float32, tau=tau,
                                tau_scale=N)
    a, b = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    b[20, 1] = float("inf")
    a[25, 2] = float("nan")
    for tau in (0.5, torch.tensor(0.5, device=device, requires_grad=True)):
        xs = [t.clone().requires_grad_() for t in (a, b)]
        ours = fused_tau.clip_loss(*xs, tau=tau)
        ours.backward()
        refs = [t.double().clone().requires_grad_() for t in (a, b)]
        tau_ref = tau.detach().double().requires_grad_() if isinstance(tau, torch.Tensor) else tau
        ref = reference.clip_loss(*refs, tau=tau_ref)
        ref.backward()
        assert torch.isnan(ours).item() and torch.isnan(ref).item()  # host-ok: CPU test
        for g, r in zip([x.grad for x in xs], [x.grad for x in refs]):
            assert torch.equal(torch.isnan(g), torch.isnan(r))
        if isinstance(tau, torch.Tensor):
            assert torch.isnan(tau.grad).item() == torch.isnan(tau_ref.grad).item()  # host-ok: CPU test


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_clip_paired_tiles_against_the_reference(backend, device, monkeypatch):
    """clip_loss's paired column tiles (the table's PAIR: two adjacent tiles from one walk over D, their
    epilogue unmasked, the diagonal's y formed by the combine from the rows) where no tile is ragged: 64 pairs
    in 16-row blocks, D = 48 in three 16-wide D-steps, splits of one pair.  Loss and every gradient, τ's
    included (one τ and one per index), against float64; a NaN feature makes everything NaN, as the
    composition; 40 pairs (ragged tiles) take single tiles."""
    import fused_tau.kernels.tile_engine as tile_engine
    import fused_tau.kernels.tile_fwd as tile_fwd

    monkeypatch.setattr(tile_engine, "split_plan", _forced_plan(1))
    key = (tile_engine.ARCH_OFF_GPU, "32", 128)
    monkeypatch.setitem(tile_engine.TILE_CONFIGS, key,
                        dict(tile_engine.TILE_CONFIGS[key], clip=dict(PAIR=2, BLOCK_D=16)))
    pairs = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                pairs.append(kwargs.get("PAIR", 1))
                return launch(*args, **kwargs)
            return call

    monkeypatch.setattr(tile_fwd, "_tile_fwd_kernel", Spy(tile_fwd._tile_fwd_kernel))
    D = 48
    for N, pair in ((64, 2), (40, 1)):
        a, b = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
        for tau in (torch.tensor(0.3, device=device, requires_grad=True),
                    (torch.rand(N, device=device) * 0.3 + 0.1).requires_grad_()):
            check_against_reference(fused_tau.clip_loss, reference.clip_loss, [a, b], dtype=torch.float32, tau=tau,
                                    tau_scale=N)
        assert pairs and set(pairs) == {pair}
        pairs.clear()
    a, b = torch.randn(64, D, device=device), torch.randn(64, D, device=device)
    a[5, 7] = float("nan")
    xs = [t.clone().requires_grad_() for t in (a, b)]
    loss = fused_tau.clip_loss(*xs, tau=0.5)
    loss.backward()
    assert torch.isnan(loss).item() and set(pairs) == {2}  # host-ok: CPU test
    assert torch.isnan(xs[0].grad).all() and torch.isnan(xs[1].grad).all()


# ---------------------------------------------------------------------------- τ layout

@pytest.mark.parametrize("fn", ["infonce_queue", "infonce_in_batch", "nt_xent", "linear_cross_entropy", "clip_loss"])
def test_tau_reaches_the_tile_engine_unexpanded(backend, device, monkeypatch, fn):
    """Issue 17: the tile engine takes τ as the row engine does, one element or one per row; a float or
    one-element τ reaches both launchers as one element (it was expanded into an N-vector)."""

    seen = []
    real_engine = ops.engine

    class _Spy:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            fn_ = getattr(self.inner, name)
            if name in ("clip_fwd", "clip_bwd", "infonce_bwd"):
                def call_abt(a, b, tau, *rest):
                    seen.append((name, tuple(tau.shape)))
                    return fn_(a, b, tau, *rest)
                return call_abt
            if name == "ntxent_bwd":
                def call_zt(z, tau, *rest):
                    seen.append((name, tuple(tau.shape)))
                    return fn_(z, tau, *rest)
                return call_zt
            if name not in ("tile_fwd", "tile_bwd"):
                return fn_

            def call(a, b, bias, tau, *rest):
                seen.append((name, tuple(tau.shape)))
                return fn_(a, b, bias, tau, *rest)
            return call

    monkeypatch.setattr(ops, "engine", lambda backend, family: _Spy(real_engine(backend, family)))
    N, K, D = 9, 13, 4
    q, k = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    tau = torch.tensor(0.3, device=device, requires_grad=True)
    q.requires_grad_()
    out = {"infonce_queue": lambda: fused_tau.infonce(q, k, torch.randn(K, D, device=device), tau=tau),
           "infonce_in_batch": lambda: fused_tau.infonce(q, k, tau=tau),
           "nt_xent": lambda: fused_tau.nt_xent(q, k, tau=tau),
           "clip_loss": lambda: fused_tau.clip_loss(q, k, tau=tau),
           "linear_cross_entropy": lambda: fused_tau.linear_cross_entropy(
               q, torch.randn(K, D, device=device), torch.randint(0, K, (N,), device=device), tau=tau)}[fn]()
    out.backward()
    expected = {"clip_loss": {"clip_fwd", "clip_bwd"}, "infonce_queue": {"tile_fwd", "infonce_bwd"},
                "infonce_in_batch": {"tile_fwd", "infonce_bwd"}, "nt_xent": {"tile_fwd", "ntxent_bwd"}}.get(
        fn, {"tile_fwd", "tile_bwd"})
    assert {name for name, _ in seen} == expected
    assert all(shape == (1,) for _, shape in seen), seen


@pytest.mark.parametrize("route", ["fused", "materialized"])
def test_padding_rows_stay_inert_under_large_logits(backend, device, monkeypatch, route):
    """The backward's padding rows (past N in the last row block) are not masked per logit: their
    shift is +inf and their scale 0, so Q = 0 even where exp of their (bias-only) logits overflows;
    with a shift of 0, u · exp2(300 log2(e)) = 0 · inf made dW and the bias gradient NaN."""
    import fused_tau.kernels.tile_bwd as tile_bwd

    monkeypatch.setattr(tile_bwd, "MATERIALIZED_BWD", route)
    N, V, D = 17, 29, 6  # 17 rows: the second 16-row block is mostly padding
    x = torch.randn(N, D, device=device)
    W = torch.randn(V, D, device=device)
    bias = torch.randn(V, device=device) * 5
    bias[::3] = 300.0  # logits of 300 at τ = 1: exp overflows fp32 unless shifted by the row's max
    y = torch.randint(0, V, (N,), device=device)
    check_against_reference(lambda x, W, b, tau: fused_tau.linear_cross_entropy(x, W, y, linear_bias=b, tau=tau),
                            lambda x, W, b, tau: reference.linear_cross_entropy(x, W, y, linear_bias=b, tau=tau),
                            [x, W, bias], dtype=torch.float32, tau=1.0)


def test_autotuning_only_behind_its_variable_and_never_keyed_on_n(monkeypatch):
    """FUSED_TAU_TILE_AUTOTUNE=1: the first call per (op, arch, kind, D-bin) times every candidate
    (here a stand-in clock that prefers the 4-warp one) and later calls at other N reuse the pick;
    the results are the table's.  Without the variable nothing is timed."""
    import fused_tau.kernels.tile_engine as tile_engine

    timed = []

    def clock(call, device):
        timed.append(dict(tile_engine._OVERRIDE))
        return 0.0 if tile_engine._OVERRIDE.get("num_warps") == 4 else 1.0

    monkeypatch.setattr(tile_engine, "_time_call", clock)
    monkeypatch.setattr(tile_engine, "_TUNED", {})
    b = torch.randn(40, 8)
    tau = torch.full((1,), 0.3)
    a = torch.randn(20, 8)
    plain, _ = ops.tile_fwd("triton", a, b, None, tau, None, None)
    assert timed == []
    monkeypatch.setenv(tile_engine.AUTOTUNE_ENV, "1")
    tuned, _ = ops.tile_fwd("triton", a, b, None, tau, None, None)
    assert len(timed) == len(tile_engine.AUTOTUNE_CANDIDATES)
    assert tile_engine._TUNED == {("fwd", tile_engine.ARCH_OFF_GPU, "32", 128): dict(BLOCK_M=64, BLOCK_N=128,
                                                                                     num_warps=4, num_stages=4)}
    torch.testing.assert_close(plain, tuned)
    ops.tile_fwd("triton", torch.randn(300, 8), b, None, tau, None, None)  # another N: the same pick, no timing
    assert len(timed) == len(tile_engine.AUTOTUNE_CANDIDATES)


@pytest.mark.parametrize("arch", [90, 80])
def test_tile_table_per_arch_and_d_bin(arch):
    """The table (kernels/tile_engine.py TILE_CONFIGS): 128-row tiles for 16-bit operands on sm_90 and sm_80,
    the whole row in one D-step (kept on-chip) up to D = 256 but never wider than D's power of two
    (D = 64 would multiply 64 columns of zero padding), 64-wide D-steps beyond, 128 × 256 tiles in
    32-wide D-steps for the LLM head's D in the thousands, capped D-steps for fp32; nothing depends on N."""
    import fused_tau.kernels.tile_engine as tile_engine

    for D, step, resident in ((32, 32, True), (64, 64, True), (128, 128, True), (200, 256, True),
                              (512, 64, False), (4096, 32, False)):
        cfg = tile_engine.tile_config(arch, torch.bfloat16, D)
        assert cfg["BLOCK_M"] >= 128 and cfg["BLOCK_N"] >= 64, (D, cfg)
        assert (cfg["BLOCK_D"], cfg["RESIDENT"]) == (step, resident), (D, cfg)
        assert cfg == tile_engine.tile_config(arch, torch.float16, D)
    assert tile_engine.tile_config(arch, torch.bfloat16, 4096)["BLOCK_N"] == 256
    assert tile_engine.tile_config(arch, torch.float32, 4096)["BLOCK_D"] == 32
    # clip_loss's forward pairs its 512-bin tiles on sm_90 only (16-wide D-steps); every other kernel alike
    clip = tile_engine.tile_config(arch, torch.bfloat16, 512, "clip")
    assert (clip.get("PAIR", 1), clip["BLOCK_D"]) == ((2, 16) if arch == 90 else (1, 64))
    # infonce / NT-Xent's da walks 64-wide column tiles at D = 128 on sm_90, 32-wide on sm_80
    assert tile_engine.tile_config(arch, torch.bfloat16, 128, "da")["BLOCK_N"] == (64 if arch == 90 else 32)
