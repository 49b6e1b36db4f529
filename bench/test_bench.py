"""The cases of ``python -m bench`` as pytest-benchmark tests:

    pytest bench --benchmark-only                       # run them
    pytest bench --benchmark-only --benchmark-save=NAME # save, then --benchmark-compare

Sizes follow the device (bench/cases.py); each test records the bytes the
case must move and its peak memory in ``extra_info``.
"""
import pytest
import torch

from . import cases as C
from .harness import peak_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ["fused_tau", "torch", "torch.compile"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", C.cases(DEVICE.type), ids=lambda c: c.name)
def test_op(benchmark, case, provider):
    inputs = C.make_inputs(case, DEVICE)
    step = C.runner(case, provider, inputs)
    if DEVICE.type == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    peak = peak_bytes(step, DEVICE, compiled=provider == "torch.compile")
    benchmark.extra_info.update(bytes_moved=case.bytes_moved(), provider=provider,
                                peak_mib=None if peak is None else peak / 2**20)
    benchmark.pedantic(timed, warmup_rounds=1, rounds=5 if DEVICE.type == "cpu" else 50)
