"""exit_head_step in Triton: exit head, policy step and latch of exiting rows, fused, one program
per row. The GPU twin of the C++ op ``eeengine::exit_head_step`` (csrc/exit_head.cpp), with the
same arguments, semantics and messages; see :func:`eeengine._custom_ops.exit_head_step`.

Per row b (all arithmetic in fp32 whatever the input dtype):
    pooled = sum_n mask[b, n] * h[b, n] / max(sum_n mask[b, n], 1)   (or h[b] when pooled)
    z = weight @ pooled + bias
    lse = max z + log sum exp(z - max z);  H = -sum softmax(z) * log_softmax(z)   (nats)
    exit = policy(H, H / log C, max softmax = exp(max z - lse), argmax z, state) or last layer
    if exit: out_logits[rows[b]] = z;  out_layer[rows[b]] = layer

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

from eeengine._custom_ops import PolicyCode, check_policy_params, exit_head_step_fake
from eeengine.kernels._compile import compile_for_gpu
from eeengine.kernels._launch import device_guard

# The policy codes as compile-time constants of the kernel (shared with csrc/ops.h through
# PolicyCode; the kernel is specialized per policy, so unused branches are compiled out).
_NONE: tl.constexpr = tl.constexpr(int(PolicyCode.NONE))
_ENTROPY: tl.constexpr = tl.constexpr(int(PolicyCode.ENTROPY))
_NORMALIZED_ENTROPY: tl.constexpr = tl.constexpr(int(PolicyCode.NORMALIZED_ENTROPY))
_MAX_PROB: tl.constexpr = tl.constexpr(int(PolicyCode.MAX_PROB))
_PATIENCE: tl.constexpr = tl.constexpr(int(PolicyCode.PATIENCE))
_PCEE: tl.constexpr = tl.constexpr(int(PolicyCode.PCEE))
_BUDGET: tl.constexpr = tl.constexpr(int(PolicyCode.BUDGET))

# Elements of hidden states one program loads per step of the pooling loop.
_TILE_ELEMENTS = 4096


@triton.jit(do_not_specialize=["layer", "num_layers", "patience", "budget"])
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
    prev_ptr,  # (B,) int64 previous argmax, -1 before layer 1 (PATIENCE); unused otherwise
    rows_ptr,  # (B,) int64, row b's index into out_logits / out_layer
    logits_ptr,  # (B, C) float32, written
    exit_ptr,  # (B,) uint8 (the storage of a bool tensor), written
    out_logits_ptr,  # (B0, C) float32 contiguous, rows of exiting rows written
    out_layer_ptr,  # (B0,) int64, entries of exiting rows written
    seq_len,  # N
    hidden_size,  # H
    num_labels,  # C
    threshold,  # fp32 τ (ENTROPY, NORMALIZED_ENTROPY, MAX_PROB, PCEE)
    patience,  # PATIENCE, PCEE
    budget,  # BUDGET: the exit layer k
    layer,  # 1-based
    num_layers,
    log_num_labels,  # fp32 log C
    POLICY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
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
    exits = tl.full([], layer, tl.int64) == num_layers
    if POLICY == _BUDGET:
        exits = exits | (layer >= budget)
    elif POLICY != _NONE:
        # Softmax statistics as torch.log_softmax; argmax is the first index of the maximum.
        zc = tl.where(c_ok, z, float("-inf"))
        z_max = tl.max(zc, axis=0)
        lse = z_max + tl.log(tl.sum(tl.exp(zc - z_max), axis=0))
        log_p = tl.where(c_ok, zc - lse, 0.0)  # padding classes contribute 1 * 0
        entropy = -tl.sum(tl.exp(log_p) * log_p, axis=0)
        if POLICY == _ENTROPY:
            exits = exits | (entropy < threshold)
        elif POLICY == _NORMALIZED_ENTROPY:
            exits = exits | (entropy / log_num_labels < threshold)
        elif POLICY == _MAX_PROB:
            exits = exits | (tl.exp(z_max - lse) >= threshold)
        elif POLICY == _PATIENCE:
            # PABEE: consecutive layers whose argmax equals the previous layer's.
            argmax = tl.argmax(zc, axis=0, tie_break_left=True).to(tl.int64)
            counter = tl.load(counter_ptr + b) + 1
            counter = tl.where(argmax == tl.load(prev_ptr + b), counter, 0)
            tl.store(counter_ptr + b, counter)
            tl.store(prev_ptr + b, argmax)
            exits = exits | (counter >= patience)
        elif POLICY == _PCEE:
            # PCEE-BERT eq. 3: consecutive confident layers (normalized entropy < τ).
            counter = tl.load(counter_ptr + b) + 1
            counter = tl.where(entropy / log_num_labels < threshold, counter, 0)
            tl.store(counter_ptr + b, counter)
            exits = exits | (counter >= patience)
    tl.store(exit_ptr + b, exits.to(tl.uint8))

    # Latch the exiting row's logits and layer into the caller's row.
    row = tl.load(rows_ptr + b)
    latch = offs_c < tl.where(exits, num_labels, 0)  # c_ok & exits, as one vector compare
    tl.store(out_logits_ptr + row * num_labels + offs_c, z, mask=latch)
    tl.store(out_layer_ptr + row, tl.full([], layer, tl.int64), mask=exits)


# True when TRITON_INTERPRET=1 was set at import: the kernel then runs on CPU tensors.
INTERPRETED = not isinstance(_exit_head_step_kernel, triton.runtime.JITFunction)


def _check_tensor(t: Tensor, name: str, device: torch.device, shape: Sequence[int] | None) -> None:
    """Raise RuntimeError naming ``name`` if ``t`` is on another device or has another shape."""
    if t.device != device:
        raise RuntimeError(f"exit_head_step: {name} must be on {device} like hidden_states")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise RuntimeError(
            f"exit_head_step: {name} must have shape {list(shape)}, got {list(t.shape)}"
        )


def _check_args(
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
) -> tuple[float, int, int]:
    """Validate the arguments as the C++ op does, without reading device memory.

    Returns:
        (threshold, patience, budget) decoded from ``params`` (0 where the policy has none).

    Raises:
        RuntimeError: naming the argument that is wrong.
    """
    device = hidden_states.device
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"exit_head_step: hidden_states must be a CUDA tensor, got {device} "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernel on CPU)"
        )
    if hidden_states.dim() not in (2, 3):
        raise RuntimeError(
            "exit_head_step: hidden_states must be pooled [B, H] or [B, N, H], got shape "
            f"{list(hidden_states.shape)}"
        )
    if hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(
            "exit_head_step: hidden_states must be float32, float16 or bfloat16, got "
            f"{hidden_states.dtype}"
        )
    batch_size, hidden_size = hidden_states.shape[0], hidden_states.shape[-1]
    if (hidden_states.dim() == 3) != (attention_mask is not None):
        raise RuntimeError(
            "exit_head_step: attention_mask must be given with hidden_states [B, N, H] (mean "
            "pooling) and omitted with pooled hidden_states [B, H]"
        )
    if attention_mask is not None:
        _check_tensor(attention_mask, "attention_mask", device, hidden_states.shape[:2])
    _check_tensor(weight, "weight", device, None)
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] < 1:
        raise RuntimeError(
            f"exit_head_step: weight must have shape [C, {hidden_size}], got {list(weight.shape)}"
        )
    num_labels = weight.shape[0]
    _check_tensor(bias, "bias", device, (num_labels,))
    if not (weight.is_floating_point() and bias.is_floating_point()):
        raise RuntimeError("exit_head_step: weight and bias must be floating point")
    threshold, patience, budget = check_policy_params(policy, params, num_labels)
    if len(state) != PolicyCode(policy).num_state:
        raise RuntimeError(
            f"exit_head_step: state: policy code {policy} takes {PolicyCode(policy).num_state} "
            f"state tensor(s), got {len(state)}"
        )
    if not (num_layers >= 1 and 1 <= layer <= num_layers):
        raise RuntimeError(
            "exit_head_step: layer must be in [1, num_layers], got "
            f"layer={layer}, num_layers={num_layers}"
        )
    for i, s in enumerate(state):
        _check_tensor(s, f"state[{i}]", device, (batch_size,))
        if s.dtype != torch.int64 or not s.is_contiguous():
            raise RuntimeError(f"exit_head_step: state[{i}] must be Long and contiguous")
    _check_tensor(rows, "rows", device, (batch_size,))
    if rows.dtype != torch.int64:
        raise RuntimeError(f"exit_head_step: rows must be Long, got {rows.dtype}")
    _check_tensor(out_logits, "out_logits", device, None)
    if not (
        out_logits.dtype == torch.float32
        and out_logits.dim() == 2
        and out_logits.shape[1] == num_labels
        and out_logits.is_contiguous()
    ):
        raise RuntimeError(
            f"exit_head_step: out_logits must be a contiguous float32 tensor [B0, {num_labels}], "
            f"got {out_logits.dtype} {list(out_logits.shape)}"
        )
    _check_tensor(out_layer, "out_layer", device, (out_logits.shape[0],))
    if out_layer.dtype != torch.int64 or not out_layer.is_contiguous():
        raise RuntimeError("exit_head_step: out_layer must be Long and contiguous")
    return threshold, patience, budget


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_config(seq_len: int, hidden_size: int, num_labels: int) -> dict[str, int]:
    """Block sizes (powers of two, as tl.arange needs) for one row of (N, H) and C classes."""
    block_h = triton.next_power_of_2(hidden_size)
    block_n = min(triton.next_power_of_2(seq_len), max(1, _TILE_ELEMENTS // block_h))
    return {"BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_C": triton.next_power_of_2(num_labels)}


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
) -> tuple[Tensor, Tensor]:
    """:func:`eeengine._custom_ops.exit_head_step` on the GPU, as one Triton launch.

    Same arguments, returns and in-place updates as the C++ op (see there), on CUDA tensors
    (CPU tensors when the kernel runs in Triton's interpreter). ``rows`` is not range-checked.

    Raises:
        RuntimeError: an argument has the wrong shape, dtype or device, or a parameter is out of
            range (the message names it).
    """
    threshold, patience, budget = _check_args(
        hidden_states, attention_mask, weight, bias, policy, params, layer, num_layers, state,
        rows, out_logits, out_layer,
    )  # fmt: skip
    batch_size, num_labels = hidden_states.shape[0], weight.shape[0]
    logits = hidden_states.new_empty((batch_size, num_labels), dtype=torch.float32)
    exit_mask = hidden_states.new_empty((batch_size,), dtype=torch.bool)
    if batch_size == 0:
        return logits, exit_mask
    hidden = _last_dim_contiguous(hidden_states)
    seq_len = hidden.shape[1] if hidden.dim() == 3 else 1
    mask = attention_mask if attention_mask is not None else hidden  # a placeholder pointer
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    mask = _last_dim_contiguous(mask)
    weight = _last_dim_contiguous(weight)
    counter, prev = (list(state) + [rows, rows])[:2]  # placeholders where the policy has none
    with device_guard(hidden):
        _exit_head_step_kernel[(batch_size,)](
            hidden, hidden.stride(0), hidden.stride(1) if hidden.dim() == 3 else 0,
            mask, mask.stride(0),
            weight, weight.stride(0), bias.contiguous(),
            counter, prev, rows.contiguous(),
            logits, exit_mask.view(torch.uint8), out_logits, out_layer,
            seq_len, hidden.shape[-1], num_labels,
            threshold, patience, budget, layer, num_layers, math.log(num_labels),
            POLICY=int(policy), HAS_MASK=attention_mask is not None,
            **_launch_config(seq_len, hidden.shape[-1], num_labels),
        )  # fmt: skip
    return logits, exit_mask


exit_head_step_triton.register_fake(exit_head_step_fake)


def compile_ahead_of_time(capability: int = 90, warp_size: int = 32) -> dict[str, object]:
    """Compile the kernel for a CUDA GPU without one (a build check): every policy with mean
    pooling over fp16 hidden states and an int64 mask, and pooled fp32 input without mask.

    Needs the compiled kernel (``TRITON_INTERPRET`` unset when this module was imported).

    Args:
        capability: the compute capability as one number, 90 for an H100 (sm_90).
        warp_size: threads per warp of the target.

    Returns:
        The compiled kernels (``triton.compiler.CompiledKernel``, with ``.asm["ptx"]`` and
        ``.asm["cubin"]``) by variant name, e.g. ``"PCEE/mask"``.

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
        "rows_ptr": "*i64",
        "logits_ptr": "*fp32",
        "exit_ptr": "*u8",
        "out_logits_ptr": "*fp32",
        "out_layer_ptr": "*i64",
    }
    floats = ("threshold", "log_num_labels")
    compiled = {}
    for code in PolicyCode:
        for has_mask in (True, False):
            if not has_mask and code != PolicyCode.PCEE:
                continue
            constexprs = {
                "POLICY": int(code),
                "HAS_MASK": has_mask,
                **_launch_config(seq_len=128, hidden_size=768, num_labels=3),
            }
            variant_pointers = pointers if has_mask else {**pointers, "hidden_ptr": "*fp32"}
            compiled[f"{code.name}/{'mask' if has_mask else 'pooled'}"] = compile_for_gpu(
                _exit_head_step_kernel, variant_pointers, constexprs, floats, capability, warp_size
            )
    return compiled
