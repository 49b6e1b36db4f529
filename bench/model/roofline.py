"""The devices the model predicts for, and the roofline that turns counts into time.

Every constant is here, with where it comes from.  "Measured" means measured on the H200 lent to
this workplace (/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04); a lead is a figure
to check and correct on the next GPU lease (bench/gpu_quick.sh measures the copy bandwidth, the
matmul rate, the L2 read bandwidth and the launch floor).

A launch of P programs of W warps, each program issuing I instructions per thread (so I·W
warp-instructions), U special-function (MUFU) instructions, loading and storing B bytes per thread
(global memory through L2), doing F tensor-core FLOPs, moving S bytes a program through shared memory's
banks (LDS / STS / LDSM, what cp.async writes there, and the operands wgmma reads from it: a 64 × N × 16
wgmma reads B's N × 16 and, unless A is in registers, A's 64 × 16), and touching D distinct bytes of device
memory (its tensors' footprints), takes

    max(D / DRAM bandwidth,  P·W·32·B / L2 bandwidth,  P·F / tensor rate,
        P·I·W / (SMs · 4 warp-instructions a clock · clock),  P·U·W / (SMs · ½ a clock · clock),
        P·S / (SMs · 128 bytes a clock · clock))
    / share,   share = (P / SMs) / ceil(P / SMs)

i.e. every term at the whole chip's rate, divided by the share of the chip the grid keeps busy (the
busiest SM runs ceil(P / SMs) programs), and at least the launch floor.  Torch operators on the
way (cuBLAS GEMMs, elementwise passes) take max(bytes / DRAM bandwidth, FLOPs / matmul rate,
launch floor).  Latency enters by Little's law: a warp waits for a loop iteration's loads before it
issues the next iteration's (a row-engine loop is not software-pipelined; the tile engine's cp.async
copies keep num_stages - 1 iterations ahead), so a launch whose resident warps keep B bytes a thread
in flight reads DRAM at most at (resident warps · 32 · B) / latency, and takes at least its DRAM
reads over that rate ("latency", not divided by the busy share: the resident warps already count
it; reads under LATENCY_MIN_BYTES, a previous launch's small outputs still in L2, left out).  The model ignores bank conflicts.
A row-engine kernel that loads more bytes than its tensors hold reads some of them twice (a row's second pass):
the second read comes from L2 while the programs in flight (resident blocks × SMs) hold less than
the L2's capacity between them, and in the share that does not fit, from DRAM again
(``reread_dram_bytes``; the L2's two partitions make its useful capacity smaller still, a lead).
"""
import dataclasses
import math

# Sources (cited once, used below)
# [H100-WP]  NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): H100 SXM5 has 132 SMs, 50 MB L2,
#            228 KB shared memory per SM (227 KB usable by one block), 64K 32-bit registers per SM.
# [H100-DS]  NVIDIA H100 datasheet: H100 SXM 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 tensor, 1980 MHz boost.
# [H200-DS]  NVIDIA H200 datasheet: 4.8 TB/s HBM3e, compute as H100 SXM.
# [CUDA-PG]  CUDA C++ Programming Guide, "Arithmetic Instructions" (throughput per SM per clock:
#            16 results for exp2 / rcp / lg2 / rsqrt / sin / cos, i.e. the MUFU unit, on cc 8.0 and 9.0;
#            4 warp schedulers per SM, each issuing one warp-instruction a clock) and "Compute Capabilities"
#            (32 resident blocks, 64 resident warps, 64K registers per SM; 164 KB / 228 KB shared memory
#            per SM and 163 KB / 227 KB per block on cc 8.0 / 9.0; 1 KB of it reserved per block).
# [KINDS]    /work/.library/device/KINDS.md: on this workplace's H200, 132 SMs, 60 MB L2, a device-to-device
#            copy at 4.3 TB/s (bytes read + written), an 8192^3 bf16 matmul at 788 TFLOP/s on random data
#            (769-798 on another machine), SM clock 1980 MHz under load.
# [C&C]      Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth" (2023): L2 read bandwidth
#            about 5.5 TB/s on an H100 PCIe (114 SMs, <= 1755 MHz); scaled by SMs and clock to an SXM part
#            that is about 7 TB/s.  A lead, the least certain constant here.
# [LAT]      DRAM load latency of a loaded H100 / H200: a lead of 600 ns (pointer-chasing figures of about
#            500-600 ns unloaded, e.g. Chips and Cheese's H100 article, plus queueing under a streaming
#            load).  To measure on a lease: the copy bandwidth of a kernel whose warps keep a known number of
#            bytes in flight.


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_hz: float
    dram_bytes_s: float  # achievable copy bandwidth, bytes read + written per second
    l2_bytes_s: float  # L2 -> SM bandwidth
    matmul_flops_s: float  # dense bf16 / fp16 tensor rate, as cuBLAS reaches it
    issue_per_clock: int = 4  # warp-instructions per SM per clock [CUDA-PG]
    mufu_per_clock: float = 0.5  # warp-instructions per SM per clock: 16 lanes [CUDA-PG]
    shared_bytes_per_clock: int = 128  # per SM: 32 banks of 4 bytes [CUDA-PG]
    launch_s: float = 2.5e-6  # per kernel: a lead (back-to-back launches of tiny kernels), to measure
    l2_capacity_bytes: float = 50e6  # [H100-WP] 50 MB; [KINDS] 60 MB on the H200
    dram_latency_s: float = 600e-9  # [LAT] a lead
    sources: str = ""

    def tensor_rate(self, dtype, kind):
        """FLOP/s of a tensor-core instruction of input ``dtype``: wgmma (HGMMA) at the matmul rate
        (bf16 / fp16), tf32 at half of it and fp8 at twice [H100-DS ratios]; mma.sync (HMMA) on Hopper at
        half of wgmma's (a lead: Hopper's full rate is reached through wgmma only)."""
        rate = self.matmul_flops_s * {"TF32": 0.5, "E4M3": 2.0, "E5M2": 2.0, "S8": 2.0}.get(dtype, 1.0)
        return rate * (0.5 if kind == "HMMA" else 1.0)


# the H200 as measured here; the H100 SXM: the same chip and clocks with the datasheet's HBM3, its copy
# bandwidth taken at the H200's measured share of its datasheet figure (4.3 / 4.8 = 0.90 of 3.35 TB/s)
H200 = Device("h200", sms=132, clock_hz=1.98e9, dram_bytes_s=4.3e12, l2_bytes_s=7.0e12, matmul_flops_s=788e12,
              l2_capacity_bytes=60e6,
              sources="[KINDS] SMs, copy 4.3 TB/s, matmul 788 TFLOP/s, clock; [C&C] L2")
H100 = Device("h100", sms=132, clock_hz=1.98e9, dram_bytes_s=3.35e12 * 4.3 / 4.8, l2_bytes_s=7.0e12,
              matmul_flops_s=788e12,
              sources="[H100-WP] SMs; [H100-DS] 3.35 TB/s x 0.90 (the H200's measured share), clock; "
                      "[KINDS] matmul as measured on the H200 (same SMs and clocks); [C&C] L2")
DEVICES = (H100, H200)

# per-SM resources by architecture [CUDA-PG]
ARCH_LIMITS = {
    90: dict(shared_per_sm=233472, shared_per_block=232448, registers=65536, warps=64, blocks=32),
    80: dict(shared_per_sm=167936, shared_per_block=166912, registers=65536, warps=64, blocks=32),
}
RESERVED_SHARED = 1024


def resident_blocks(arch, num_warps, registers, shared_bytes):
    """Blocks of a kernel one SM holds at once (registers allocated per warp in units of 256, i.e. a
    thread's count rounded up to 8; shared memory plus the 1 KiB reserved per block)."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = lim["registers"] // (regs_per_warp * num_warps)
    by_warps = lim["warps"] // num_warps
    by_shared = lim["shared_per_sm"] // (shared_bytes + RESERVED_SHARED)
    return max(0, min(lim["blocks"], by_regs, by_warps, by_shared))


def busy_share(programs, device):
    """The share of the chip a grid keeps busy: the mean programs per SM over the busiest SM's count."""
    if programs <= 0:
        return 1.0
    return (programs / device.sms) / math.ceil(programs / device.sms)


def reread_dram_bytes(device, programs, resident_blocks, read_footprint, loaded_bytes):
    """DRAM bytes of a launch's second reads: of the ``loaded_bytes - read_footprint`` bytes loaded again,
    the share whose working set (each program's ``read_footprint / programs`` bytes, times the programs in
    flight) does not fit in L2."""
    again = loaded_bytes - read_footprint
    if again <= 0 or programs <= 0 or not resident_blocks:
        return 0.0
    in_flight = min(programs, resident_blocks * device.sms) * read_footprint / programs
    return again * max(0.0, 1.0 - device.l2_capacity_bytes / in_flight)


# Reads below this many bytes are left out of the latency term: a launch's small inputs (per-row statistics
# a previous launch just wrote) come from L2, and such a launch costs about its start anyway
LATENCY_MIN_BYTES = 1 << 20


def latency_seconds(device, programs, num_warps, resident_blocks, inflight_bytes, read_bytes):
    """The least time to read ``read_bytes`` from DRAM when each thread keeps ``inflight_bytes`` of loads
    in flight (Little's law over the warps the chip holds at once: the grid's, at most resident_blocks a
    SM); 0 when unknown."""
    if read_bytes < LATENCY_MIN_BYTES or not inflight_bytes or not resident_blocks or programs <= 0:
        return 0.0
    warps = min(programs, resident_blocks * device.sms) * num_warps
    return read_bytes * device.dram_latency_s / (warps * 32 * inflight_bytes)


def kernel_time(device, programs, num_warps, counts, dram_bytes, latency_s=0.0):
    """(seconds, binding limit, {limit: seconds}) of one launch; ``counts`` are per program (sass.Counts),
    ``latency_s`` the launch's latency_seconds."""
    warps = programs * num_warps
    rate_sm = device.sms * device.clock_hz
    terms = {
        "dram": dram_bytes / device.dram_bytes_s,
        "l2": warps * 32 * (counts.load_bytes + counts.store_bytes) / device.l2_bytes_s,
        "tensor": sum(programs * flops / device.tensor_rate(dtype, kind)
                      for (dtype, kind), flops in counts.tensor_flops.items()),
        "issue": warps * counts.instructions / (rate_sm * device.issue_per_clock),
        "mufu": warps * counts.mufu / (rate_sm * device.mufu_per_clock),
        "shared": programs * counts.shared_bytes / (rate_sm * device.shared_bytes_per_clock),
    }
    share = busy_share(programs, device)
    limit = max(terms, key=terms.get)
    t = terms[limit] / share
    terms["latency"] = latency_s
    if latency_s > t:
        t, limit = latency_s, "latency"
    if t < device.launch_s:
        return device.launch_s, "launch", terms
    return t, limit, terms


def torch_op_time(device, nbytes, flops):
    """(seconds, limit) of one torch operator: a GEMM at the matmul rate, anything else at the copy bandwidth."""
    t_mem, t_mm = nbytes / device.dram_bytes_s, flops / device.matmul_flops_s
    t = max(t_mem, t_mm)
    if t < device.launch_s:
        return device.launch_s, "launch"
    return t, ("gemm" if t_mm >= t_mem else "dram")
