"""Giving the system back memory the executors no longer use (Linux with glibc; no-ops
elsewhere).

Two kinds stay resident after their last use:

- heap pages freed by transient copies (numpy arrays, protobuf messages, serialized graphs):
  glibc keeps them for later allocations (:func:`release_freed_heap`);
- pages of a checkpoint file read through a memory map. ``safetensors.torch.load_file`` maps
  the whole ``model.safetensors`` privately and every tensor is a view of that one mapping, so
  the pages of tensors that were read once (say, to build ONNX Runtime's copy of the layers)
  stay in the process's resident memory while any tensor of the file lives, even after those
  tensors are gone (:func:`drop_file_pages`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Iterable, Iterator

from torch import Tensor

MADV_DONTNEED = 4  # Linux <sys/mman.h>

Span = tuple[int, int]  # [start, end) in bytes of the address space


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def release_freed_heap() -> None:
    """Give the heap pages freed by the graph building back to the system (glibc's
    ``malloc_trim``). The transient copies of the weights (numpy, protobuf, serialized bytes)
    are freed but would otherwise stay in the process's resident memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def drop_file_pages(tensors: Iterable[Tensor], keep: Iterable[Tensor] = ()) -> int:
    """Drop from resident memory the pages that hold the bytes of ``tensors`` and lie in a
    private file mapping (``madvise(MADV_DONTNEED)``), except pages that also hold bytes of a
    tensor in ``keep``; the mapping itself stays.

    For tensors about to be released. A dropped page that is read again is read again from the
    file, so clean pages keep their values; a page changed in memory since the load would get
    the file's bytes back. Tensors elsewhere (heap, anonymous memory, another device) are left
    alone.

    Args:
        tensors: CPU tensors, any dtype; their bytes are ``data_ptr()`` up to the last element.
        keep: tensors that stay in use (the rest of the model).

    Returns:
        The number of bytes dropped (0 where the platform cannot).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    mappings = _private_file_mappings()
    page = mmap.PAGESIZE
    kept = [(_floor(s, page), _ceil(e, page)) for s, e in _merged(_spans(keep))]
    dropped = 0
    for start, end in _merged(_spans(tensors)):
        if not any(low <= start and end <= high for low, high in mappings):
            continue
        for low, high in _without((_ceil(start, page), _floor(end, page)), kept):
            if libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), MADV_DONTNEED):
                raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
            dropped += high - low
    return dropped


def _spans(tensors: Iterable[Tensor]) -> Iterator[Span]:
    """The bytes each CPU tensor with elements spans, from its first to its last element."""
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        steps = zip(tensor.shape, tensor.stride(), strict=True)
        last = sum((size - 1) * abs(stride) for size, stride in steps)
        yield tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


def _merged(spans: Iterable[Span]) -> list[Span]:
    """``spans`` sorted, overlapping or touching ones joined."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _without(span: Span, holes: list[Span]) -> Iterator[Span]:
    """The non-empty parts of ``span`` outside the sorted, disjoint ``holes``."""
    start, end = span
    for low, high in holes:
        if high <= start or low >= end:
            continue
        if low > start:
            yield start, low
        start = max(start, high)
    if start < end:
        yield start, end


def _private_file_mappings() -> list[Span]:
    """The address ranges of the process's private mappings of files (``/proc/self/maps``:
    a ``p`` permission and a non-zero inode); none where the file cannot be read."""
    mappings = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[1].endswith("p") and fields[4] != "0":
                    low, high = (int(address, 16) for address in fields[0].split("-"))
                    mappings.append((low, high))
    except OSError:
        return []
    return mappings


def _ceil(address: int, page: int) -> int:
    return -(-address // page) * page


def _floor(address: int, page: int) -> int:
    return address // page * page
