"""Process-wide ONNX Runtime settings shared by every session of the ONNX Runtime executor
(:mod:`eeengine.executors.onnxruntime`): one intra-op thread pool, one scratch arena, the
options a session gets (:func:`session_options`), the options a neighbour session of the same
process needs (:func:`neighbour_session_options`), and torch on one thread while the sessions
own the cores (:func:`single_threaded_torch`).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import onnxruntime
import torch


def session_options(num_threads: int) -> onnxruntime.SessionOptions:
    """Options for one executor session: ONNX Runtime's global pool (:func:`_global_thread_pool`)
    or, where the process keeps per-session pools, ``num_threads`` non-spinning workers; scratch
    from the shared arena (:func:`_shared_arena`)."""
    options = onnxruntime.SessionOptions()
    if _global_thread_pool(num_threads):
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        # Each session has its own workers: spinning, the seven pools' workers would take
        # turns on the cores (measured 4-5x slower at batch 1).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Scratch memory comes from one arena shared by every session of the process (see
    # _shared_arena), not from malloc at each run: a layer's large buffers (the attention
    # probabilities, 12.6 MB at 512 tokens) were fresh pages at every session run, faulted in
    # again at each of the seven runs of a forward pass, where one whole-model session pays
    # that once. Measured at 512 tokens, batch 1, one thread: per-layer execution 13-15 %
    # slower than one session over the same graphs with malloc, 2.6 % with the shared arena.
    _shared_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    # The memory-pattern planner asks for one block sized for a whole run; with the shared
    # arena, buffers sized per tensor reuse each other's chunks better (measured faster).
    options.enable_mem_pattern = False
    return options


_GLOBAL_POOL_THREADS: list[int] = []  # the size of ONNX Runtime's global pool, once made
# Set to "0" before the first executor is made to keep per-session thread pools (slower at
# batch 1; for processes that make other ONNX Runtime sessions with their own pools).
GLOBAL_POOL_ENV = "EEENGINE_ORT_GLOBAL_THREAD_POOL"


def global_thread_pool_size() -> int | None:
    """The intra-op threads of ONNX Runtime's process-wide pool if an executor made it, else
    None. Once it exists, ONNX Runtime refuses every new session of the process that asks for
    its own pool: make them with ``SessionOptions.use_per_session_threads = False``."""
    return _GLOBAL_POOL_THREADS[0] if _GLOBAL_POOL_THREADS else None


def neighbour_session_options(num_threads: int) -> onnxruntime.SessionOptions:
    """Options for another ONNX Runtime session of a process that may hold these executors (a
    peer in a benchmark, a whole-model session): ORT's defaults with ``num_threads`` intra-op
    threads, or ORT's global pool once an executor made it (ORT then allows no other pool;
    the pool's own thread count applies)."""
    options = onnxruntime.SessionOptions()
    if global_thread_pool_size() is None:
        options.intra_op_num_threads = num_threads
    else:
        options.use_per_session_threads = False
    return options


def _global_thread_pool(num_threads: int) -> bool:
    """Whether the executor's sessions run on ONNX Runtime's process-wide intra-op thread pool,
    which the first executor of the process makes with its ``num_threads`` (unless
    :data:`GLOBAL_POOL_ENV` is "0" then). Later executors share it whatever they ask for (a
    warning names a different count): ONNX Runtime allows no per-session pool beside it.

    One pool for every session means one set of workers, which spin between the layer
    sessions of a forward pass, as the workers of a single ONNX Runtime session do, instead of
    sleeping and being woken for every operator, as each session's own non-spinning pool must
    (see :func:`session_options`). Measured on the default SST-2 checkpoint at int8, batch 1,
    two threads: full depth 3.44 -> 2.09 ms, the default policy 2.19 -> 1.49 ms; batch 32
    unchanged or faster (BENCHMARKS.md, "Issue 12").
    """
    if not _GLOBAL_POOL_THREADS:
        if os.environ.get(GLOBAL_POOL_ENV, "1") == "0":
            return False
        onnxruntime.set_global_thread_pool_sizes(num_threads, 1)
        _GLOBAL_POOL_THREADS.append(num_threads)
    elif _GLOBAL_POOL_THREADS[0] != num_threads:
        warnings.warn(
            f"ONNX Runtime's global thread pool has {_GLOBAL_POOL_THREADS[0]} threads (made by "
            f"this process's first eeengine executor); this executor shares it instead of "
            f"using {num_threads} (set {GLOBAL_POOL_ENV}=0 for per-session pools)",
            stacklevel=4,
        )
    return True


@functools.cache
def _shared_arena() -> None:
    """Register one CPU arena allocator with ONNX Runtime's environment (once per process),
    for sessions created with ``session.use_env_allocators``.

    It grows by what is asked (no power-of-two rounding) and keeps its chunks, so its size is
    the largest working set of one session run (the shapes change at every compaction; seven
    per-session arenas each kept every size it ever served: 2.9 GiB at batch 256 x 128 tokens
    where malloc needed 0.97 GiB).
    """
    info = onnxruntime.OrtMemoryInfo(
        "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
    )
    # max_mem 0 (no limit), extend strategy 1 (kSameAsRequested), defaults for the rest.
    config = onnxruntime.OrtArenaCfg(0, 1, -1, -1)
    try:
        onnxruntime.create_and_register_allocator(info, config)
    except Exception as error:  # another library of the process registered one first
        if "already" not in str(error).lower():
            raise


class _TorchThreads(threading.local):
    """What :func:`single_threaded_torch` keeps: per thread, its open contexts and its thread
    count from before them; per process (class attributes), the open contexts of all threads
    and the count from before the first."""

    depth = 0
    saved = 1
    lock = threading.Lock()
    process_depth = 0
    process_saved = 1


_torch_threads = _TorchThreads()


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """``torch.set_num_threads(1)`` in the calling thread while inside.

    torch's thread count is partly per thread and partly process-wide (OpenMP's is per thread,
    torch's default for new threads is shared), so on leaving, a thread gets back the count it
    had, and when the last context open in the process closes, the count from before the
    first is set again: overlapping :meth:`eeengine.Engine.predict` calls from several threads
    never leave it at 1. torch code of other threads may also run on one thread meanwhile.
    """
    local, shared = _torch_threads, _TorchThreads
    with shared.lock:
        if shared.process_depth == 0:
            shared.process_saved = torch.get_num_threads()
        shared.process_depth += 1
    if local.depth == 0:
        local.saved = torch.get_num_threads()
        torch.set_num_threads(1)
    local.depth += 1
    try:
        yield
    finally:
        local.depth -= 1
        if local.depth == 0:
            torch.set_num_threads(local.saved)
        with shared.lock:
            shared.process_depth -= 1
            if shared.process_depth == 0:
                torch.set_num_threads(shared.process_saved)
