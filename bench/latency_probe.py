"""DRAM load latency, the constant behind the performance model's latency term (bench/model/roofline.py,
``dram_latency_s``, a lead of 600 ns until measured): one warp an SM streams a buffer far larger than the
L2, one 16-byte load a thread an iteration, each iteration's loads used before the next are issued
(``num_stages=1``: not software-pipelined), so an iteration takes one load latency and the run
``iters`` of them (132 × 512 bytes in flight move about 0.1 TB/s: far below the bandwidth, the latency
alone is timed).  ``python -m bench.gpu_quick`` records it beside the model's constant."""
import torch
import triton
import triton.language as tl


@triton.jit
def _latency_probe_kernel(x_ptr, out_ptr, iters, BLOCK: tl.constexpr):
    """out[p] = Σ_i x[p, i, :]: program p walks its own contiguous rows of BLOCK fp32, one a loop iteration."""
    p = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    row = x_ptr + p * iters * BLOCK
    for i in range(iters):
        acc += tl.load(row + i * BLOCK + offs)
    tl.store(out_ptr + p * BLOCK + offs, acc)


BLOCK = 128  # one warp, 4 fp32 (16 bytes) a thread


def dram_latency_ns(device, iters=4096, programs=None, repeats=5):
    """The median time of one loop iteration, ns: one warp a program, one program an SM (``programs``: the
    SM count on CUDA), ``iters`` rows of 512 bytes each (132 SMs x 4096 x 512 B = 277 MB, beyond any L2).
    Also returns the checksum's error (the probe must have read what it timed)."""
    if programs is None:
        programs = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    x = torch.ones(programs * iters * BLOCK, device=device, dtype=torch.float32)
    out = torch.empty(programs * BLOCK, device=device, dtype=torch.float32)

    def run():
        _latency_probe_kernel[(programs,)](x, out, iters, BLOCK=BLOCK, num_warps=1, num_stages=1)

    run()  # compile
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e6 / iters)
        else:
            import time
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e9 / iters)
    times.sort()
    return times[len(times) // 2], float((out - iters).abs().max())
