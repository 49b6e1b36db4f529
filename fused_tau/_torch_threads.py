"""The torch path's threads, for both engines' launchers (fused_tau/_torch_*.py).

On CPU a launcher's chunks are shared out among ``torch.get_num_threads()`` threads, each running
its ops on one core (``for_each``), rather than every op of every chunk splitting itself
across the cores: an op split across cores ends when its slowest part does, and on a busy
machine a core's part can wait a whole scheduler time slice (measured: 16 ms per op, whatever
its size, on 2 cores with other work on them), which a chunk loop of hundreds of small ops
pays hundreds of times.  A thread that takes the next chunk when it is done with one is
slowed by a busy core no more than its share of the work.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# below this many elements a call runs on the caller's thread alone: handing work to another
# thread costs tens of µs, and torch runs ops this small on one core anyway
PARALLEL_MIN_ELEMENTS = 1 << 18

_pool = None
_pool_lock = threading.Lock()


def _reset_pool():
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)  # a forked child has none of the parent's threads


def _workers(n):
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fused_tau")
        return _pool


def threads_for(device, elements):
    """How many threads ``for_each`` would use for a call on ``device`` touching ``elements``."""
    if device.type != "cpu" or elements < PARALLEL_MIN_ELEMENTS:
        return 1
    return torch.get_num_threads()


def for_each(tasks, work, device, elements, scratch=None):
    """``work(task)`` for every task, in any order and concurrently: on CPU (for ``elements`` ≥
    PARALLEL_MIN_ELEMENTS) by ``torch.get_num_threads()`` threads, the caller's among them, each
    taking the next task when done with one, with torch's intra-op threads set to 1 meanwhile
    (restored after; the workers start with that setting, and with the caller's grad and inference
    modes).  Tasks must write disjoint outputs; what each computes does not depend on the thread.
    With ``scratch`` (a function of no argument), each thread makes ``scratch()`` once, before its
    first task, and calls ``work(task, that)``: buffers reused by the thread's tasks (on CPU a fresh
    buffer costs its first-touch page faults, as much as a pass over it)."""
    tasks = list(tasks)
    n = min(threads_for(device, elements), len(tasks))
    if scratch is not None:
        plain, held = work, threading.local()

        def work(task):
            buffers = getattr(held, "buffers", None)
            if buffers is None:
                buffers = held.buffers = scratch()
            plain(task, buffers)

    if n <= 1:
        for task in tasks:
            work(task)
        return
    lock, stop = threading.Lock(), threading.Event()
    remaining = iter(tasks)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drain():
        with torch.inference_mode() if inference else torch.set_grad_enabled(grad):
            while not stop.is_set():
                with lock:
                    task = next(remaining, None)
                if task is None:
                    return
                try:
                    work(task)
                except BaseException:
                    stop.set()
                    raise

    _one_thread_each(+1)
    try:
        futures = [_workers(n - 1).submit(drain) for _ in range(n - 1)]
        try:
            drain()
        finally:
            errors = [f.exception() for f in futures]  # waits for every worker
        for e in errors:
            if e is not None:
                raise e
    finally:
        _one_thread_each(-1)


_active_calls, _threads_before = 0, None


def _one_thread_each(delta):
    """Set torch's intra-op threads to 1 while any for_each call runs in parallel, and back to what it
    was when the last one ends (two calls from two of the caller's threads may overlap)."""
    global _active_calls, _threads_before
    with _pool_lock:
        if delta > 0 and _active_calls == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _active_calls += delta
        if _active_calls == 0:
            torch.set_num_threads(_threads_before)
