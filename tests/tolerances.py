"""The one tolerance table of the suite, keyed by the input dtype.

Results are compared with the float64 reference computed on the same input
values.  Kernels accumulate in fp32, so the error is the rounding of the
output to its dtype plus fp32 accumulation; where torch itself is further off
(small τ in fp32), ``assert_close_to_ref`` also accepts
``|ours - ref| <= |torch - ref| + tol``.
"""
import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}


def tol(dtype):
    return TOLERANCES[dtype]


def assert_close_to_ref(ours, ref, dtype, torch_same_dtype=None, scale=1.0):
    """``ours`` against the float64 ``ref`` at the tolerance of ``dtype`` (scaled by
    ``scale`` where an error is amplified, e.g. a gradient summed over many rows)."""
    t = tol(dtype)
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    same_inf = (ours == ref) & torch.isinf(ref)
    nan_ok = torch.isnan(ours) & torch.isnan(ref)
    err = torch.where(same_inf | nan_ok, 0.0, (ours - ref).abs())
    bound = scale * (t["atol"] + t["rtol"] * ref.abs())
    if torch_same_dtype is not None:
        err_torch = (torch_same_dtype.detach().double().cpu() - ref).abs()
        bound = torch.maximum(bound, err_torch + scale * t["atol"])
    bad = ~(err <= bound) & ~(same_inf | nan_ok)
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements off ({dtype}): at flat index {i} "
            f"ours={ours.flatten()[i].item()!r} ref={ref.flatten()[i].item()!r} "
            f"bound={bound.flatten()[i].item():.3g}"
        )
