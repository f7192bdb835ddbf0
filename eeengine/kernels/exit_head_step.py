"""exit_head_step in Triton: exit head, policy step and latch of exiting rows, fused, one program
per row. The GPU twin of the C++ op ``eeengine::exit_head_step`` (csrc/exit_head.cpp), with the
same arguments, semantics and messages; see :func:`eeengine._custom_ops.exit_head_step`.

Per row b (all arithmetic in fp32 whatever the input dtype):
    pooled = sum_n mask[b, n] * h[b, n] / max(sum_n mask[b, n], 1)   (or h[b] when pooled)
    z = weight @ pooled + bias
    lse = max z + log sum exp(z - max z);  H = -sum softmax(z) * log_softmax(z)   (nats)
    exit = policy(H, H / log C, max softmax = 1 / sum exp(z - max z), argmax z, state, LTE score)
           or last layer; the state (counters, ELBERT's window, MPEE's memory) updated in place
    if exit: out_logits[rows[b]] = z (MPEE: its memory);  out_layer[rows[b]] = layer

Registered as the custom op ``eeengine::exit_head_step_triton`` (own name: the CUDA dispatch key
of ``eeengine::exit_head_step`` belongs to the CUDA C++ kernel of csrc/exit_head_cuda.cu, and
the engine chooses between the two at construction). Nothing here reads device memory on the
host: ``rows`` is not range-checked (the C++ CPU op does check it), so the op can run inside a
CUDA graph and under ``torch.cuda.set_sync_debug_mode("error")``.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``
is set before this module is imported (the tests do so), and :func:`compile_ahead_of_time`
compiles it for a GPU target without one.
"""

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from eeengine._custom_ops import exit_head_step_fake
from eeengine.kernels._compile import compile_for_gpu
from eeengine.kernels._launch import (
    device_guard,
    last_dim_contiguous,
    require_gpu_or_interpreter,
)
from eeengine.kernels.exit_head_step_checks import check_args
from eeengine.policy_codes import PolicyCode, PolicyParams, WindowTest

# The policy and window-test codes as compile-time constants of the kernel (the table of
# eeengine.policy_codes; the kernel is specialized per policy, so unused branches compile out).
_NONE: tl.constexpr = tl.constexpr(int(PolicyCode.NONE))
_ENTROPY: tl.constexpr = tl.constexpr(int(PolicyCode.ENTROPY))
_NORMALIZED_ENTROPY: tl.constexpr = tl.constexpr(int(PolicyCode.NORMALIZED_ENTROPY))
_MAX_PROB: tl.constexpr = tl.constexpr(int(PolicyCode.MAX_PROB))
_PATIENCE: tl.constexpr = tl.constexpr(int(PolicyCode.PATIENCE))
_PCEE: tl.constexpr = tl.constexpr(int(PolicyCode.PCEE))
_BUDGET: tl.constexpr = tl.constexpr(int(PolicyCode.BUDGET))
_ELBERT: tl.constexpr = tl.constexpr(int(PolicyCode.ELBERT))
_LTE: tl.constexpr = tl.constexpr(int(PolicyCode.LTE))
_MPEE: tl.constexpr = tl.constexpr(int(PolicyCode.MPEE))
_MONOTONIC: tl.constexpr = tl.constexpr(int(WindowTest.MONOTONIC))
_STABLE: tl.constexpr = tl.constexpr(int(WindowTest.STABLE))

# Elements of hidden states one program loads per step of the pooling loop.
_TILE_ELEMENTS = 4096


@triton.jit
def _softmax_stats(v, c_ok):
    """Softmax statistics of v[0:C] (padding classes masked out), as torch.log_softmax:
    returns (v with -inf padding, max, sum exp(v - max), entropy in nats)."""
    vc = tl.where(c_ok, v, float("-inf"))
    v_max = tl.max(vc, axis=0)
    sum_exp = tl.sum(tl.exp(vc - v_max), axis=0)
    log_p = tl.where(c_ok, vc - (v_max + tl.log(sum_exp)), 0.0)  # padding: 1 * 0
    return vc, v_max, sum_exp, -tl.sum(tl.exp(log_p) * log_p, axis=0)


@triton.jit
def _elbert_window_steady(
    window_ptr, b, zc, z_max, sum_exp, argmax, c_ok, offs_c, num_labels, window, window_range,
    first, WINDOW_TEST: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """ELBERT's second stage: append this layer to row b's window of the last N layers (oldest
    first; at layer 1 every entry) and test it for the current prediction ``argmax``."""
    offs_w = tl.arange(0, BLOCK_W)
    w_ok = offs_w < window
    newest = (offs_w == window - 1) | first  # the entries this layer writes
    shifted = offs_w < window - 1  # the others take the next entry
    if WINDOW_TEST == _STABLE:
        labels_ptr = window_ptr + b * window + offs_w  # (B, N) int64
        labels = tl.load(labels_ptr + 1, mask=shifted, other=0)
        labels = tl.where(newest, argmax, labels)
        tl.store(labels_ptr, labels, mask=w_ok)
        steady = tl.sum((w_ok & (labels != argmax)).to(tl.int32), axis=0) == 0
    else:
        # softmax as torch.softmax computes it: exp(z - max) * (1 / sum).
        probs = tl.exp(zc - z_max) * (1.0 / sum_exp)
        tile_ptr = (
            window_ptr + b * window * num_labels + offs_w[:, None] * num_labels + offs_c[None, :]
        )  # (B, N, C) fp32
        tile = tl.load(tile_ptr + num_labels, mask=shifted[:, None] & c_ok[None, :], other=0.0)
        tile = tl.where(newest[:, None], probs[None, :], tile)
        tl.store(tile_ptr, tile, mask=w_ok[:, None] & c_ok[None, :])
        q = tl.sum(tl.where(offs_c[None, :] == argmax, tile, 0.0), axis=1)  # q_k = p_k(argmax)
        if WINDOW_TEST == _MONOTONIC:
            # q_prev[k] = q[k - 1], picked out of q by a one-hot (BLOCK_W, BLOCK_W) selection.
            q_prev = tl.sum(tl.where(offs_w[:, None] - 1 == offs_w[None, :], q[None, :], 0.0), 1)
            falls = w_ok & (offs_w >= 1) & (q < q_prev)
            steady = tl.sum(falls.to(tl.int32), axis=0) == 0
        else:
            q_max = tl.max(tl.where(w_ok, q, float("-inf")), axis=0)
            q_min = tl.min(tl.where(w_ok, q, float("inf")), axis=0)
            steady = q_max - q_min <= window_range
    return steady


@triton.jit(do_not_specialize=["layer", "num_layers", "patience", "budget", "window"])
def _exit_head_step_kernel(
    hidden_ptr,  # (B, N, H), last dim contiguous; pooled input is (B, 1, H)
    hidden_stride_b,
    hidden_stride_n,
    mask_ptr,  # (B, N) any dtype, nonzero = real token; unused when HAS_MASK is False
    mask_stride_b,
    weight_ptr,  # (C, H), last dim contiguous
    weight_stride_c,
    bias_ptr,  # (C,)
    counter_ptr,  # (B,) int64 policy counter (PATIENCE, PCEE); unused otherwise
    prev_ptr,  # (B,) PATIENCE: previous int64 argmax, or fp32 value when REGRESSION
    window_ptr,  # ELBERT: (B, N) int64 labels (STABLE) or (B, N, C) fp32 probabilities
    memory_ptr,  # MPEE: (B, C) fp32 classifier memory
    score_ptr,  # LTE: (B,) fp32 score
    rows_ptr,  # (B,) int64, row b's index into out_logits / out_layer
    logits_ptr,  # (B, C) float32, written
    exit_ptr,  # (B,) uint8 (the storage of a bool tensor), written
    out_logits_ptr,  # (B0, C) float32 contiguous, rows of exiting rows written
    out_layer_ptr,  # (B0,) int64, entries of exiting rows written
    seq_len,  # N
    hidden_size,  # H
    num_labels,  # C
    threshold,  # fp32 τ
    patience,  # PATIENCE, PCEE
    delta,  # fp32 δ, PATIENCE on a regression head
    budget,  # BUDGET: the exit layer k
    window,  # ELBERT: N
    window_range,  # fp32 r, ELBERT RANGE
    memory_keep,  # fp32 1 - λ, MPEE
    memory_weight,  # fp32 λ, MPEE
    layer,  # 1-based
    num_layers,
    log_num_labels,  # fp32 log C
    POLICY: tl.constexpr,
    WINDOW_TEST: tl.constexpr,
    REGRESSION: tl.constexpr,  # C == 1
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden_size
    row_ptr = hidden_ptr + b * hidden_stride_b

    # Masked mean pooling; padding tokens are never loaded.
    if HAS_MASK:
        pooled = tl.zeros([BLOCK_H], dtype=tl.float32)
        count = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            m = tl.load(mask_ptr + b * mask_stride_b + offs_n, mask=offs_n < seq_len, other=0)
            m = m.to(tl.float32)
            h = tl.load(
                row_ptr + offs_n[:, None] * hidden_stride_n + offs_h[None, :],
                mask=(m != 0)[:, None] & h_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            pooled += tl.sum(h * m[:, None], axis=0)
            count += m
        pooled = pooled / tl.maximum(tl.sum(count, axis=0), 1.0)
    else:
        pooled = tl.load(row_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)

    # Linear head.
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_labels
    w = tl.load(
        weight_ptr + offs_c[:, None] * weight_stride_c + offs_h[None, :],
        mask=c_ok[:, None] & h_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    z = tl.sum(w * pooled[None, :], axis=1)
    z += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(logits_ptr + b * num_labels + offs_c, z, mask=c_ok)

    # Exit rule; every row exits at the last layer whatever the policy says.
    first = layer == 1
    exits = tl.full([], layer, tl.int64) == num_layers
    out = z  # the logits an exiting row latches
    if POLICY == _BUDGET:
        exits = exits | (layer >= budget)
    elif POLICY == _LTE:
        # BERxiT learning-to-exit: the score predicts "not yet correct".
        exits = exits | (tl.load(score_ptr + b) < threshold)
    elif POLICY == _PATIENCE:
        # PABEE: consecutive layers whose prediction agrees with the previous layer's
        # (regression: |v_l - v_{l-1}| < δ).
        if REGRESSION:
            value = tl.sum(z, axis=0)  # the one output
            same = (layer > 1) & (tl.abs(value - tl.load(prev_ptr + b)) < delta)
            tl.store(prev_ptr + b, value)
        else:
            zc = tl.where(c_ok, z, float("-inf"))
            argmax = tl.argmax(zc, axis=0, tie_break_left=True).to(tl.int64)
            same = (layer > 1) & (argmax == tl.load(prev_ptr + b))
            tl.store(prev_ptr + b, argmax)
        counter = tl.where(same, tl.load(counter_ptr + b) + 1, 0)
        tl.store(counter_ptr + b, counter)
        exits = exits | (counter >= patience)
    elif POLICY == _MPEE:
        # MPEE eq. 10: m_1 = z_1, m_l = (1 - λ) m_{l-1} + λ z_l; exit when H(m_l) < τ (nats).
        memory_row = memory_ptr + b * num_labels + offs_c
        memory = tl.load(memory_row, mask=c_ok, other=0.0)
        out = tl.where(first, z, memory_keep * memory + memory_weight * z)
        tl.store(memory_row, out, mask=c_ok)
        _, _, _, entropy = _softmax_stats(out, c_ok)
        exits = exits | (entropy < threshold)
    elif POLICY != _NONE:
        zc, z_max, sum_exp, entropy = _softmax_stats(z, c_ok)
        if POLICY == _ENTROPY:
            exits = exits | (entropy < threshold)
        elif POLICY == _NORMALIZED_ENTROPY:
            exits = exits | (entropy / log_num_labels < threshold)
        elif POLICY == _MAX_PROB:
            # max softmax as torch.softmax computes it: exp(max - max) * (1 / sum) = 1 / sum.
            exits = exits | (1.0 / sum_exp >= threshold)
        elif POLICY == _PCEE:
            # PCEE-BERT eq. 3: consecutive confident layers (normalized entropy < τ).
            counter = tl.load(counter_ptr + b) + 1
            counter = tl.where(entropy / log_num_labels < threshold, counter, 0)
            tl.store(counter_ptr + b, counter)
            exits = exits | (counter >= patience)
        elif POLICY == _ELBERT:
            # Stage 1 (eq. 5): normalized entropy < τ; stage 2 from layer N on: the window,
            # updated at every layer whichever stage decides.
            argmax = tl.argmax(zc, axis=0, tie_break_left=True).to(tl.int64)
            steady = _elbert_window_steady(
                window_ptr, b, zc, z_max, sum_exp, argmax, c_ok, offs_c, num_labels, window,
                window_range, first, WINDOW_TEST, BLOCK_W,
            )  # fmt: skip
            confident = entropy / log_num_labels < threshold
            exits = exits | confident | (steady & (layer >= window))
    tl.store(exit_ptr + b, exits.to(tl.uint8))

    # Latch the exiting row's logits (MPEE: its memory) and layer into the caller's row.
    row = tl.load(rows_ptr + b)
    latch = offs_c < tl.where(exits, num_labels, 0)  # c_ok & exits, as one vector compare
    tl.store(out_logits_ptr + row * num_labels + offs_c, out, mask=latch)
    tl.store(out_layer_ptr + row, tl.full([], layer, tl.int64), mask=exits)


# True when TRITON_INTERPRET=1 was set at import: the kernel then runs on CPU tensors.
INTERPRETED = not isinstance(_exit_head_step_kernel, triton.runtime.JITFunction)


def _launch_config(
    seq_len: int, hidden_size: int, num_labels: int, decoded: PolicyParams
) -> dict[str, int]:
    """The compile-time constants of one launch: the policy, and block sizes (powers of two,
    as tl.arange needs) for one row of (N, H), C classes and ELBERT's window of N layers."""
    block_h = triton.next_power_of_2(hidden_size)
    block_n = min(triton.next_power_of_2(seq_len), max(1, _TILE_ELEMENTS // block_h))
    return {
        "POLICY": int(decoded.code),
        "WINDOW_TEST": int(decoded.window_test),
        "REGRESSION": num_labels == 1,
        "BLOCK_N": block_n,
        "BLOCK_H": block_h,
        "BLOCK_C": triton.next_power_of_2(num_labels),
        "BLOCK_W": triton.next_power_of_2(max(decoded.window, 1)),
    }


@torch.library.custom_op(
    "eeengine::exit_head_step_triton", mutates_args=("state", "out_logits", "out_layer")
)
def exit_head_step_triton(
    hidden_states: Tensor,
    attention_mask: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    policy: int,
    params: Sequence[float],
    layer: int,
    num_layers: int,
    state: list[Tensor],
    rows: Tensor,
    out_logits: Tensor,
    out_layer: Tensor,
    lte_score: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`eeengine._custom_ops.exit_head_step` on the GPU, as one Triton launch.

    Same arguments, returns and in-place updates as the C++ op (see there), on CUDA tensors
    (CPU tensors when the kernel runs in Triton's interpreter). ``rows`` is not range-checked.

    Raises:
        RuntimeError: an argument has the wrong shape, dtype or device, or a parameter is out of
            range (the message names it).
    """
    require_gpu_or_interpreter("exit_head_step", hidden_states, INTERPRETED)
    decoded = check_args(
        hidden_states, attention_mask, weight, bias, policy, params, layer, num_layers, state,
        rows, out_logits, out_layer, lte_score,
    )  # fmt: skip
    batch_size, num_labels = hidden_states.shape[0], weight.shape[0]
    logits = hidden_states.new_empty((batch_size, num_labels), dtype=torch.float32)
    exit_mask = hidden_states.new_empty((batch_size,), dtype=torch.bool)
    if batch_size == 0:
        return logits, exit_mask
    hidden = last_dim_contiguous(hidden_states)
    seq_len = hidden.shape[1] if hidden.dim() == 3 else 1
    mask = attention_mask if attention_mask is not None else hidden  # a placeholder pointer
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    mask = last_dim_contiguous(mask)
    weight = last_dim_contiguous(weight)
    # The state tensors by role; placeholders (never read) where the policy has none.
    code = decoded.code
    counter = state[0] if code in (PolicyCode.PATIENCE, PolicyCode.PCEE) else rows
    prev = state[1] if code == PolicyCode.PATIENCE else rows
    window = state[0] if code == PolicyCode.ELBERT else rows
    memory = state[0] if code == PolicyCode.MPEE else logits
    score = lte_score.float().contiguous() if lte_score is not None else logits
    d = decoded
    with device_guard(hidden):
        _exit_head_step_kernel[(batch_size,)](
            hidden, hidden.stride(0), hidden.stride(1) if hidden.dim() == 3 else 0,
            mask, mask.stride(0),
            weight, weight.stride(0), bias.contiguous(),
            counter, prev, window, memory, score, rows.contiguous(),
            logits, exit_mask.view(torch.uint8), out_logits, out_layer,
            seq_len, hidden.shape[-1], num_labels,
            d.threshold, d.patience, d.delta, d.budget, d.window, d.window_range, d.memory_keep,
            d.memory_weight, layer, num_layers, math.log(num_labels),
            HAS_MASK=attention_mask is not None,
            **_launch_config(seq_len, hidden.shape[-1], num_labels, decoded),
        )  # fmt: skip
    return logits, exit_mask


exit_head_step_triton.register_fake(exit_head_step_fake)


def compile_ahead_of_time(capability: int = 90, warp_size: int = 32) -> dict[str, object]:
    """Compile the kernel for a CUDA GPU without one (a build check): every policy with mean
    pooling over fp16 hidden states and an int64 mask (ELBERT with each window test, PATIENCE
    on a classification and a regression head), and pooled fp32 input without mask.

    Needs the compiled kernel (``TRITON_INTERPRET`` unset when this module was imported).

    Args:
        capability: the compute capability as one number, 90 for an H100 (sm_90).
        warp_size: threads per warp of the target.

    Returns:
        The compiled kernels (``triton.compiler.CompiledKernel``, with ``.asm["ptx"]`` and
        ``.asm["cubin"]``) by variant name, e.g. ``"PCEE/mask"``, ``"ELBERT/STABLE/mask"``.

    Raises:
        RuntimeError: the module was imported in interpreter mode.
    """
    if INTERPRETED:
        raise RuntimeError("compile_ahead_of_time needs TRITON_INTERPRET unset at import")
    pointers = {
        "hidden_ptr": "*fp16",
        "mask_ptr": "*i64",
        "weight_ptr": "*fp32",
        "bias_ptr": "*fp32",
        "counter_ptr": "*i64",
        "prev_ptr": "*i64",
        "window_ptr": "*fp32",
        "memory_ptr": "*fp32",
        "score_ptr": "*fp32",
        "rows_ptr": "*i64",
        "logits_ptr": "*fp32",
        "exit_ptr": "*u8",
        "out_logits_ptr": "*fp32",
        "out_layer_ptr": "*i64",
    }
    floats = (
        "threshold", "delta", "window_range", "memory_keep", "memory_weight", "log_num_labels",
    )  # fmt: skip
    # (name, policy, pointer types, number of classes, pooled input)
    variants = [(f"{code.name}/mask", PolicyParams(code), pointers, 3) for code in PolicyCode]
    variants += [
        (f"ELBERT/{test.name}/mask", PolicyParams(PolicyCode.ELBERT, window=3, window_test=test),
         {**pointers, "window_ptr": "*i64" if test == WindowTest.STABLE else "*fp32"}, 3)
        for test in WindowTest
    ]  # fmt: skip
    variants += [
        ("PATIENCE/regression/mask", PolicyParams(PolicyCode.PATIENCE),
         {**pointers, "prev_ptr": "*fp32"}, 1),
        ("PCEE/pooled", PolicyParams(PolicyCode.PCEE), {**pointers, "hidden_ptr": "*fp32"}, 3),
    ]  # fmt: skip
    compiled = {}
    for name, decoded, variant_pointers, num_labels in variants:
        constexprs = {
            "HAS_MASK": not name.endswith("pooled"),
            **_launch_config(128, 768, num_labels, decoded),
        }
        compiled[name] = compile_for_gpu(
            _exit_head_step_kernel, variant_pointers, constexprs, floats, capability, warp_size
        )
    return compiled
