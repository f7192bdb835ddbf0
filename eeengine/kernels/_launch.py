"""What every Triton launcher shares."""

import contextlib
from contextlib import AbstractContextManager

import torch
from torch import Tensor


def device_guard(tensor: Tensor) -> AbstractContextManager[object]:
    """Make ``tensor``'s GPU the current device for a launch: Triton launches on the current
    device, so a model on ``cuda:1`` would otherwise run its kernels on ``cuda:0`` (reading
    memory of another device). A no-op for CPU tensors (Triton's interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def last_dim_contiguous(t: Tensor) -> Tensor:
    """``t`` with unit stride in its last dimension (what the kernels index by), copied only
    if it has not (other strides are passed to the kernel)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def require_gpu_or_interpreter(op: str, hidden_states: Tensor, interpreted: bool) -> None:
    """Raise RuntimeError unless ``hidden_states`` is a CUDA tensor or the kernel runs in
    Triton's interpreter (``interpreted``: TRITON_INTERPRET=1 was set at import)."""
    device = hidden_states.device
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"{op}: hidden_states must be a CUDA tensor, got {device} "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernel on CPU)"
        )
