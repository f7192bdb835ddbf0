"""Binding torch tensors and numpy arrays to ONNX Runtime IOBinding inputs and outputs by
pointer (no copies): the executor's sessions (:mod:`eeengine.executors.onnxruntime`) and the
row graph's (:mod:`eeengine.executors.row_loop`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}


def bind_pointer(bind: Callable, name: str, value: Tensor | np.ndarray) -> None:
    """Bind a contiguous CPU tensor or array to an IOBinding input or output by pointer."""
    if isinstance(value, np.ndarray):
        bind(name, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
    else:
        bind(name, "cpu", 0, _NUMPY_DTYPES[value.dtype], list(value.shape), value.data_ptr())
