"""Test setup: kernels run under the Triton interpreter when there is no GPU.

Every numeric test takes the ``backend`` fixture and runs once per backend:
``triton`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) and ``torch``
(the fallback).  ``FUSED_TAU_TEST_BACKENDS=triton`` narrows the run (on a GPU).
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (first import of fused_tau.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fused_tau._dispatch import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BACKENDS = [b for b in os.environ.get("FUSED_TAU_TEST_BACKENDS", "triton,torch").split(",") if b]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=_BACKENDS)
def backend(request, monkeypatch):
    """Force one backend for the test; on CPU both stream rows and tiles in small blocks
    (chunks for the torch path) so that odd sizes cross several block boundaries, and the tile
    kernels split their long dimension across programs (several splits on small shapes)."""
    name = request.param
    if name == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        import fused_tau.kernels.row_engine as row
        import fused_tau.kernels.tile_bwd as tile_bwd
        import fused_tau.kernels.tile_engine as tile_engine
        import fused_tau.kernels.tile_softmax_bwd as tile_softmax_bwd

        if DEVICE == "cpu":
            monkeypatch.setattr(row, "MAX_BLOCK", 16)
            monkeypatch.setattr(tile_engine, "BLOCK_CAP", 16)  # every tile block of the table at most 16
            monkeypatch.setattr(tile_bwd, "GROUP_M", 2)  # several groups of row blocks, the last one partial
            # few rows of two blocks or more are split across programs (SM_COUNT_OFF_GPU below)
            monkeypatch.setattr(row, "MIN_BLOCKS_PER_SPLIT", 1)
            monkeypatch.setattr(tile_bwd, "MATERIALIZED_CHUNK_ELEMENTS", 0)  # several row chunks of ds
            # split the long dimension on small shapes (a split may be one tile, the last one partial)
            monkeypatch.setattr(tile_engine, "SM_COUNT_OFF_GPU", 16)
            monkeypatch.setattr(tile_engine, "MIN_TILES_PER_SPLIT", 1)
            # the combines merge 2 splits a step over 8 rows a program: several steps, the last partial
            monkeypatch.setattr(tile_engine, "COMBINE_SPLITS", 2)
            monkeypatch.setattr(tile_engine, "COMBINE_BLOCK", 8)
            # the backward's rows kernel sums 2 splits a step over 2 rows a program
            monkeypatch.setattr(tile_softmax_bwd, "ROWS_SPLITS", 2)
            monkeypatch.setattr(tile_softmax_bwd, "ROWS_MAX", 2)
            monkeypatch.setattr(tile_softmax_bwd, "ROWS_ELEMENTS", 32)
    else:
        import fused_tau._torch_row_engine as torch_row_engine
        import fused_tau._torch_threads as torch_threads
        import fused_tau._torch_tile as torch_tile

        monkeypatch.setattr(torch_tile, "CHUNK_ELEMENTS", 256)  # several column chunks on small shapes
        # the CPU path's threads on small shapes too: several row chunks and tiles shared among threads
        monkeypatch.setattr(torch_threads, "PARALLEL_MIN_ELEMENTS", 0)
        monkeypatch.setattr(torch_row_engine, "CHUNK_ELEMENTS", 64)
        monkeypatch.setattr(torch_tile, "ROW_BLOCK", 3)
        monkeypatch.setattr(torch_tile, "COL_PARTS", 3)
    monkeypatch.setenv("FUSED_TAU_BACKEND", name)
    return name


@pytest.fixture
def no_launch(backend, monkeypatch):
    """Every engine of the active backend fails loudly when asked for a kernel or a torch-path
    launcher: a bad-input test that takes this fixture proves its error is raised before any launch."""
    import fused_tau._ops as ops

    class _NoEngine:
        def __init__(self, family):
            self.family = family

        def __getattr__(self, name):
            def launched(*args, **kwargs):
                raise AssertionError(f"{self.family}.{name} ran before the argument check")
            return launched

    monkeypatch.setattr(ops, "engine", lambda backend, family: _NoEngine(family))
    return backend
