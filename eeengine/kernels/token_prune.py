"""token_prune in Triton: MPEE token pruning at one layer, one program per row. The GPU twin of
the C++ op ``eeengine::token_prune`` (csrc/token_prune.cpp), with the same arguments, returns,
semantics and messages; see :func:`eeengine._custom_ops.token_prune` and the rule in
:mod:`eeengine.token_pruning` (ground truth: ``token_prune_reference``).

Per row b (fp32 math whatever the input dtype; N = seq_len, c = the row's real non-[CLS] tokens):
    a_n = mean_h softmax_{n real}(q_cls,h . K_h,n / sqrt(d))            (0 on padding)
    m_n = (1 - beta) m_n + beta a_n on the real non-[CLS] tokens          (0 elsewhere)
    k = ceil(r c), in float64 as :func:`eeengine.token_pruning.num_kept`
    kept: the k highest m_n, ties to the lower position (NaN ranks as -inf, as in the C++ op)
    out: [CLS], kept tokens in order, fusion token sum_{dropped} w_n h_n (w = m renormalised
         over the dropped tokens, uniform if their sum is 0; memory: that sum), zero padding

The top-k needs no sort and no scratch memory: the memory values are mapped to int32 keys whose
order is the float order, a 32-step bisection over the key range finds the k-th largest key V
(the largest T with #{key >= T} >= k), the row keeps every key > V and, of the keys == V, the
k - #{key > V} at the lowest positions (an exclusive cumsum). That is exactly the stable
descending sort of the reference. The kept tokens' output slots are an inclusive cumsum.

k is exact although Triton passes Python floats as fp32: the host splits r (a double) into
three fp32 parts whose sum is r exactly, the kernel adds them in float64 (every partial sum is
representable) and takes ceil(r * c) in float64 as Python does. Keep ratios below ~1e-38 lose
their low part to fp32 denormals and are not exact (no schedule uses one).

Registered as the custom op ``eeengine::token_prune_triton`` (own name, as
``exit_head_step_triton``: ``eeengine::token_prune`` belongs to the C++ extension, which has no
CUDA kernel for it, so the runtime prunes with this op on both GPU backends, "triton" and
"cuda"; see :func:`eeengine._custom_ops.prune_op`). Nothing here reads
device memory on the host: the output width ``pruned_length(seq_len, keep_ratio)`` depends only
on shapes, and the outputs are allocated zero-filled (kept indices -1) so the kernel writes
only the real entries. The op can run inside a CUDA graph.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``
is set before this module is imported (the tests do so), and :func:`compile_ahead_of_time`
compiles it for a GPU target without one.
"""

import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from eeengine._custom_ops import token_prune_fake
from eeengine.kernels._compile import compile_for_gpu
from eeengine.kernels._launch import device_guard, last_dim_contiguous, require_gpu_or_interpreter
from eeengine.token_pruning import TokenPruneOutput, pruned_length

# Elements of one [BLOCK_N, BLOCK_D] key tile or [BLOCK_N, BLOCK_H] hidden-state tile.
_TILE_ELEMENTS = 4096


@triton.jit
def _token_prune_kernel(
    hidden_ptr,  # (B, N, H), last dim contiguous
    hidden_stride_b,
    hidden_stride_n,
    mask_ptr,  # (B, N) any dtype (bool as uint8), nonzero = real token
    mask_stride_b,
    mask_stride_n,
    query_ptr,  # (B, heads, d), last dim contiguous
    query_stride_b,
    query_stride_h,
    key_ptr,  # (B, heads, N, d), last dim contiguous (SDPA head views are read in place)
    key_stride_b,
    key_stride_h,
    key_stride_n,
    memory_ptr,  # (B, N - 1) float32
    memory_stride_b,
    memory_stride_n,
    out_hidden_ptr,  # (B, out_len, H) contiguous, zero-filled
    out_mask_ptr,  # (B, out_len) contiguous, the input mask's dtype, zero-filled
    out_memory_ptr,  # (B, out_len - 1) float32 contiguous, zero-filled
    kept_indices_ptr,  # (B, out_len) int64 contiguous, filled with -1
    seq_len,  # N
    hidden_size,  # H
    num_heads,
    head_size,  # d
    out_len,
    keep_ratio_hi,  # fp32 parts of the float64 keep ratio r = hi + mid + lo exactly
    keep_ratio_mid,
    keep_ratio_lo,
    one_minus_beta,  # fp32 1 - beta (computed in float64 on the host, as the C++ op)
    beta,
    scale,  # fp32 1 / sqrt(d)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < seq_len
    m_in = tl.load(mask_ptr + b * mask_stride_b + offs_n * mask_stride_n, mask=n_ok, other=0)
    real = m_in != 0
    is_cls = offs_n == 0
    cand = real & (offs_n >= 1)

    # 1. Head-averaged [CLS] attention over the row's real keys; padding keys are never loaded.
    attention = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for h in range(num_heads):
        q_row = query_ptr + b * query_stride_b + h * query_stride_h
        k_row = key_ptr + b * key_stride_b + h * key_stride_h
        scores = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, head_size, BLOCK_D):
            d_ok = d0 + offs_d < head_size
            q = tl.load(q_row + d0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            k = tl.load(
                k_row + offs_n[:, None] * key_stride_n + (d0 + offs_d)[None, :],
                mask=real[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            scores += tl.sum(k * q[None, :], axis=1)
        scores = tl.where(real, scores * scale, float("-inf"))
        # A finite floor: a row without real keys gives exp(-inf) = 0, not exp(NaN).
        max_score = tl.maximum(tl.max(scores, axis=0), -3.0e38)
        probs = tl.where(real, tl.exp(scores - max_score), 0.0)
        total = tl.sum(probs, axis=0)
        attention += probs / tl.where(total > 0, total, 1.0)

    # 2. Class-attention memory of the real non-[CLS] tokens (0 elsewhere).
    memory_prev = tl.load(
        memory_ptr + b * memory_stride_b + (offs_n - 1) * memory_stride_n, mask=cand, other=0.0
    )
    memory = one_minus_beta * memory_prev + beta * (attention / num_heads)
    memory = tl.where(cand, memory, 0.0)

    # 3. k = ceil(r c) in float64, exactly as Python's math.ceil(r * c).
    count = tl.sum(cand.to(tl.int32), axis=0)
    ratio = (tl.cast(keep_ratio_hi, tl.float64) + tl.cast(keep_ratio_mid, tl.float64)) + tl.cast(
        keep_ratio_lo, tl.float64
    )
    kept_count = tl.ceil(ratio * count.to(tl.float64)).to(tl.int64)

    # Order-preserving int32 keys of the memory (NaN as -inf, -0 as +0); non-candidates below
    # every candidate.
    score = tl.where(memory != memory, float("-inf"), memory)
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = tl.where(cand, key, -(2**31) - 1)
    # V = the largest T in [-2^31, 2^31) with #{key >= T} >= k (the k-th largest key if k >= 1).
    lo = tl.full([], -(2**31), tl.int64)
    hi = tl.full([], 2**31 - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        enough = tl.sum((key >= mid).to(tl.int64), axis=0) >= kept_count
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = key > lo
    ties = (key == lo).to(tl.int32)
    ties_before = tl.cumsum(ties, axis=0) - ties
    room = kept_count - tl.sum(above.to(tl.int64), axis=0)
    kept = cand & (above | ((ties != 0) & (ties_before < room)))
    dropped = cand & ~kept
    slot = tl.where(is_cls, 0, tl.cumsum(kept.to(tl.int32), axis=0))
    written = kept | is_cls

    # 4. Fusion weights: the memory renormalised over the dropped tokens (uniform if it sums to
    # 0); the fusion token's memory is that sum.
    dropped_memory = tl.where(dropped, memory, 0.0)
    memory_total = tl.sum(dropped_memory, axis=0)
    num_dropped = tl.sum(dropped.to(tl.int32), axis=0)
    uniform = tl.where(dropped, 1.0 / tl.maximum(num_dropped, 1).to(tl.float32), 0.0)
    weights = tl.where(
        memory_total > 0, dropped_memory / tl.where(memory_total > 0, memory_total, 1.0), uniform
    )
    has_fusion = num_dropped > 0
    fusion_slot = 1 + kept_count

    # 5. Output row: [CLS], kept tokens, fusion token; padding stays as allocated.
    out_row = b * out_len
    out_mask_dtype = out_mask_ptr.dtype.element_ty
    tl.store(kept_indices_ptr + out_row + slot, offs_n.to(tl.int64), mask=written)
    tl.store(
        out_mask_ptr + out_row + slot, tl.where(is_cls, real, 1).to(out_mask_dtype), mask=written
    )
    tl.store(out_memory_ptr + b * (out_len - 1) + slot - 1, memory, mask=kept)
    tl.store(out_mask_ptr + out_row + fusion_slot, tl.full([], 1, out_mask_dtype), mask=has_fusion)
    tl.store(out_memory_ptr + b * (out_len - 1) + kept_count, memory_total, mask=has_fusion)

    in_row = hidden_ptr + b * hidden_stride_b
    out_h = out_hidden_ptr + out_row * hidden_size
    offs_h = tl.arange(0, BLOCK_H)
    fusion_width = tl.where(has_fusion, hidden_size, 0)  # h_ok & has_fusion, as one compare
    for h0 in range(0, hidden_size, BLOCK_H):
        h_ok = h0 + offs_h < hidden_size
        x = tl.load(
            in_row + offs_n[:, None] * hidden_stride_n + (h0 + offs_h)[None, :],
            mask=(written | dropped)[:, None] & h_ok[None, :],
            other=0.0,
        )
        tl.store(
            out_h + slot[:, None] * hidden_size + (h0 + offs_h)[None, :],
            x,
            mask=written[:, None] & h_ok[None, :],
        )
        fusion = tl.sum(x.to(tl.float32) * weights[:, None], axis=0)
        tl.store(
            out_h + fusion_slot * hidden_size + h0 + offs_h,
            fusion.to(out_hidden_ptr.dtype.element_ty),
            mask=h0 + offs_h < fusion_width,
        )


# True when TRITON_INTERPRET=1 was set at import: the kernel then runs on CPU tensors.
INTERPRETED = not isinstance(_token_prune_kernel, triton.runtime.JITFunction)


def _check_args(
    hidden_states: Tensor,
    attention_mask: Tensor,
    cls_query: Tensor,
    key: Tensor,
    memory: Tensor,
    keep_ratio: float,
    beta: float,
) -> None:
    """Validate the arguments as the C++ op does (same messages), without reading device
    memory.

    Raises:
        RuntimeError: naming the argument that is wrong.
    """
    require_gpu_or_interpreter("token_prune", hidden_states, INTERPRETED)
    device = hidden_states.device
    for t, name in (
        (attention_mask, "attention_mask"),
        (cls_query, "cls_query"),
        (key, "key"),
        (memory, "memory"),
    ):
        if t.device != device:
            raise RuntimeError(f"token_prune: {name} must be on {device} like hidden_states")
    if hidden_states.dim() != 3:
        raise RuntimeError(
            f"token_prune: hidden_states must have shape [B, N, H], got {list(hidden_states.shape)}"
        )
    dtype = hidden_states.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(
            f"token_prune: hidden_states must be float32, float16 or bfloat16, got {dtype}"
        )
    batch_size, seq_len, _ = hidden_states.shape
    if seq_len < 1:
        raise RuntimeError(
            "token_prune: hidden_states must hold at least the [CLS] token, got N = 0"
        )
    if tuple(attention_mask.shape) != (batch_size, seq_len):
        raise RuntimeError(
            f"token_prune: attention_mask must have shape [{batch_size}, {seq_len}], got "
            f"{list(attention_mask.shape)}"
        )
    if cls_query.dim() != 3 or cls_query.shape[0] != batch_size:
        raise RuntimeError(
            f"token_prune: cls_query must have shape [{batch_size}, heads, head_size], got "
            f"{list(cls_query.shape)}"
        )
    heads, head_size = cls_query.shape[1], cls_query.shape[2]
    if heads < 1 or head_size < 1:
        raise RuntimeError(
            "token_prune: cls_query must have heads >= 1 and head_size >= 1, got "
            f"{list(cls_query.shape)}"
        )
    if tuple(key.shape) != (batch_size, heads, seq_len, head_size):
        raise RuntimeError(
            f"token_prune: key must have shape [{batch_size}, {heads}, {seq_len}, {head_size}], "
            f"got {list(key.shape)}"
        )
    if cls_query.dtype != dtype or key.dtype != dtype:
        raise RuntimeError(
            f"token_prune: cls_query and key must have the dtype of hidden_states ({dtype}), "
            f"got {cls_query.dtype} and {key.dtype}"
        )
    if tuple(memory.shape) != (batch_size, seq_len - 1):
        raise RuntimeError(
            f"token_prune: memory must have shape [{batch_size}, {seq_len - 1}], got "
            f"{list(memory.shape)}"
        )
    if memory.dtype != torch.float32:
        raise RuntimeError(f"token_prune: memory must be float32, got {memory.dtype}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise RuntimeError(f"token_prune: keep_ratio must be in [0, 1], got {keep_ratio}")
    if not 0.0 <= beta <= 1.0:
        raise RuntimeError(f"token_prune: beta must be in [0, 1], got {beta}")


def split_keep_ratio(keep_ratio: float) -> tuple[float, float, float]:
    """Three fp32-representable parts (hi, mid, lo) of the float64 ``keep_ratio`` whose sum,
    added left to right in float64, is ``keep_ratio`` exactly (above fp32's denormals)."""
    hi = float(np.float32(keep_ratio))
    mid = float(np.float32(keep_ratio - hi))
    lo = float(np.float32(keep_ratio - hi - mid))
    return hi, mid, lo


def _launch_config(seq_len: int, hidden_size: int, head_size: int) -> dict[str, int]:
    """Block sizes (powers of two, as tl.arange needs): the whole row of N tokens, and tiles of
    at most _TILE_ELEMENTS key or hidden-state elements."""
    block_n = triton.next_power_of_2(seq_len)
    width = max(1, _TILE_ELEMENTS // block_n)
    return {
        "BLOCK_N": block_n,
        "BLOCK_D": min(triton.next_power_of_2(head_size), width),
        "BLOCK_H": min(triton.next_power_of_2(hidden_size), width),
    }


@torch.library.custom_op("eeengine::token_prune_triton", mutates_args=())
def token_prune_triton(
    hidden_states: Tensor,
    attention_mask: Tensor,
    cls_query: Tensor,
    key: Tensor,
    memory: Tensor,
    keep_ratio: float,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`eeengine._custom_ops.token_prune` on the GPU, as one Triton launch.

    Same arguments and returns (hidden_states, attention_mask, memory, kept_indices; wrap them
    in :class:`eeengine.token_pruning.TokenPruneOutput`) as the C++ op, on CUDA tensors (CPU
    tensors when the kernel runs in Triton's interpreter). Inference only (no autograd).

    Raises:
        RuntimeError: an argument has the wrong shape, dtype or device, or is out of range (the
            message names it).
    """
    _check_args(hidden_states, attention_mask, cls_query, key, memory, keep_ratio, beta)
    batch_size, seq_len, hidden_size = hidden_states.shape
    heads, head_size = cls_query.shape[1], cls_query.shape[2]
    out_len = pruned_length(seq_len, keep_ratio)
    out_hidden = hidden_states.new_zeros((batch_size, out_len, hidden_size))
    out_mask = attention_mask.new_zeros((batch_size, out_len))
    out_memory = memory.new_zeros((batch_size, out_len - 1))
    kept_indices = torch.full(
        (batch_size, out_len), -1, dtype=torch.long, device=hidden_states.device
    )
    if batch_size == 0:
        return out_hidden, out_mask, out_memory, kept_indices
    hidden = last_dim_contiguous(hidden_states)
    query = last_dim_contiguous(cls_query)
    keys = last_dim_contiguous(key)
    mask = (
        attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask
    )
    out_mask_view = out_mask.view(torch.uint8) if out_mask.dtype == torch.bool else out_mask
    with device_guard(hidden):
        _token_prune_kernel[(batch_size,)](
            hidden, hidden.stride(0), hidden.stride(1),
            mask, mask.stride(0), mask.stride(1),
            query, query.stride(0), query.stride(1),
            keys, keys.stride(0), keys.stride(1), keys.stride(2),
            memory, memory.stride(0), memory.stride(1) if seq_len > 1 else 1,
            out_hidden, out_mask_view, out_memory, kept_indices,
            seq_len, hidden_size, heads, head_size, out_len,
            *split_keep_ratio(keep_ratio), 1.0 - beta, beta, 1.0 / math.sqrt(head_size),
            **_launch_config(seq_len, hidden_size, head_size),
        )  # fmt: skip
    return out_hidden, out_mask, out_memory, kept_indices


token_prune_triton.register_fake(token_prune_fake)


def token_prune(
    hidden_states: Tensor,
    attention_mask: Tensor,
    cls_query: Tensor,
    key: Tensor,
    memory: Tensor,
    keep_ratio: float,
    beta: float,
) -> TokenPruneOutput:
    """:func:`token_prune_triton` with its outputs as a
    :class:`eeengine.token_pruning.TokenPruneOutput`, the signature of every token_prune
    backend (:func:`eeengine._custom_ops.prune_op`)."""
    return TokenPruneOutput(
        *token_prune_triton(
            hidden_states, attention_mask, cls_query, key, memory, float(keep_ratio), float(beta)
        )
    )


def compile_ahead_of_time(capability: int = 90, warp_size: int = 32) -> dict[str, object]:
    """Compile the kernel for a CUDA GPU without one (a build check): fp16 hidden states with an
    int64 mask at 128 tokens (MiniLM: H 384, 12 heads of 32), and fp32 with a bool (uint8) mask
    at 512 tokens, the widest row.

    Needs the compiled kernel (``TRITON_INTERPRET`` unset when this module was imported).

    Args:
        capability: the compute capability as one number, 90 for an H100 (sm_90).
        warp_size: threads per warp of the target.

    Returns:
        The compiled kernels (``triton.compiler.CompiledKernel``, with ``.asm["ptx"]`` and
        ``.asm["cubin"]``) by variant name, e.g. ``"fp16/N128"``.

    Raises:
        RuntimeError: the module was imported in interpreter mode.
    """
    if INTERPRETED:
        raise RuntimeError("compile_ahead_of_time needs TRITON_INTERPRET unset at import")
    floats = ("keep_ratio_hi", "keep_ratio_mid", "keep_ratio_lo", "one_minus_beta", "beta", "scale")
    compiled = {}
    for dtype, mask_dtype, seq_len in (("fp16", "i64", 128), ("fp32", "u8", 512)):
        pointers = {
            "hidden_ptr": f"*{dtype}",
            "mask_ptr": f"*{mask_dtype}",
            "query_ptr": f"*{dtype}",
            "key_ptr": f"*{dtype}",
            "memory_ptr": "*fp32",
            "out_hidden_ptr": f"*{dtype}",
            "out_mask_ptr": f"*{mask_dtype}",
            "out_memory_ptr": "*fp32",
            "kept_indices_ptr": "*i64",
        }
        constexprs = _launch_config(seq_len, hidden_size=384, head_size=32)
        compiled[f"{dtype}/N{seq_len}"] = compile_for_gpu(
            _token_prune_kernel, pointers, constexprs, floats, capability, warp_size
        )
    return compiled
