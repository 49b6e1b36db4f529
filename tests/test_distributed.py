"""torch.distributed: in-batch losses with gather=True see every rank's keys as negatives, and
MoCoQueue enqueues the keys of all ranks.  Two processes on the gloo backend, on CPU."""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # minutes, not seconds: `pytest -m "not slow"` leaves it out

WORLD, N, D, SIZE = 2, 5, 8, 16


def _worker(rank, init_file, backend, results):
    os.environ["FUSED_TAU_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import fused_tau

        g = torch.Generator().manual_seed(0)
        q_all = torch.randn(WORLD * N, D, generator=g)
        k_all = torch.randn(WORLD * N, D, generator=g)
        q = q_all[rank * N:(rank + 1) * N].clone().requires_grad_()
        k = k_all[rank * N:(rank + 1) * N].clone().requires_grad_()
        loss = fused_tau.infonce(q, k, tau=0.2, gather=True)
        loss.backward()
        clip = fused_tau.clip_loss(q.detach(), k.detach(), tau=0.2, gather=True)
        mq = fused_tau.MoCoQueue(D, SIZE)
        mq.enqueue(k.detach())
        results[rank] = dict(loss=loss.item(), q_grad=q.grad.clone(), k_grad=k.grad.clone(), clip=clip.item(),
                             queue=mq.queue.clone(), ptr=int(mq.ptr))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_and_queue_across_two_ranks(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # children inherit it
    manager = mp.Manager()
    results = manager.dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), backend, results), nprocs=WORLD,
                           start_method="spawn")
    g = torch.Generator().manual_seed(0)
    q_all = torch.randn(WORLD * N, D, generator=g).double().requires_grad_()
    k_all = torch.randn(WORLD * N, D, generator=g).double().requires_grad_()
    logits = q_all @ k_all.T / 0.2
    per_row = torch.nn.functional.cross_entropy(logits, torch.arange(WORLD * N), reduction="none")
    for rank in range(WORLD):
        # each rank's loss is the mean over its own queries against every rank's keys
        expected = per_row[rank * N:(rank + 1) * N].mean()
        assert abs(results[rank]["loss"] - expected.item()) < 1e-5
    # the sum of the ranks' losses differentiates like the global loss (DDP sums, then averages)
    (per_row.view(WORLD, N).mean(1).sum()).backward()
    q_grad = torch.cat([results[r]["q_grad"] for r in range(WORLD)])
    torch.testing.assert_close(q_grad.double(), q_all.grad, rtol=1e-4, atol=1e-6)
    # all_gather's backward sums every rank's gradient into each rank's own keys
    k_grad = torch.cat([results[r]["k_grad"] for r in range(WORLD)])
    torch.testing.assert_close(k_grad.double(), k_all.grad, rtol=1e-4, atol=1e-6)
    clip_expected = (per_row.mean() + torch.nn.functional.cross_entropy(logits.T, torch.arange(WORLD * N))) / 2
    assert abs(sum(results[r]["clip"] for r in range(WORLD)) / WORLD - clip_expected.item()) < 1e-5
    # MoCoQueue: both ranks enqueued all 2N keys, in rank order, and hold the same queue
    k_cat = k_all.detach().float()
    for rank in range(WORLD):
        assert results[rank]["ptr"] == WORLD * N
        torch.testing.assert_close(results[rank]["queue"][:WORLD * N], k_cat)
    torch.testing.assert_close(results[0]["queue"], results[1]["queue"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
