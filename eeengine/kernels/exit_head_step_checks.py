"""The argument checks of the Triton ``exit_head_step`` (:mod:`eeengine.kernels.exit_head_step`):
the C++ op's checks and messages (csrc/exit_head.cpp), made on tensor metadata only, so that
the launch reads nothing from device memory and can run inside a CUDA graph."""

from collections.abc import Sequence

import torch
from torch import Tensor

from eeengine.policy_codes import PolicyCode, PolicyParams, decode_params, state_specs

_TYPE_NAMES = {torch.int64: "Long", torch.float32: "Float"}  # as the C++ op names them


def _check_tensor(t: Tensor, name: str, device: torch.device, shape: Sequence[int] | None) -> None:
    """Raise RuntimeError naming ``name`` if ``t`` is on another device or has another shape."""
    if t.device != device:
        raise RuntimeError(f"exit_head_step: {name} must be on {device} like hidden_states")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise RuntimeError(
            f"exit_head_step: {name} must have shape {list(shape)}, got {list(t.shape)}"
        )


def check_args(
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
    lte_score: Tensor | None,
) -> PolicyParams:
    """Validate the arguments as the C++ op does (same messages), without reading device
    memory; the caller checked that ``hidden_states`` can run the kernel.

    Returns:
        ``params`` decoded.

    Raises:
        RuntimeError: naming the argument that is wrong.
    """
    device = hidden_states.device
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
    decoded = decode_params(policy, params, num_labels)
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
    for i, (s, (what, dtype, shape)) in enumerate(
        zip(state, state_specs(decoded, batch_size, num_labels), strict=True)
    ):
        if not (s.device == device and s.dtype == dtype and s.shape == shape and s.is_contiguous()):
            raise RuntimeError(
                f"exit_head_step: state[{i}] must be {_TYPE_NAMES[dtype]} of shape {list(shape)}, "
                f"contiguous, on {device} ({what}), got {s.dtype} {list(s.shape)} on {s.device}"
            )
    if (lte_score is not None) != (decoded.code == PolicyCode.LTE):
        raise RuntimeError(
            f"exit_head_step: lte_score must be given for policy code {int(PolicyCode.LTE)} "
            "(lte) and only for it"
        )
    if lte_score is not None:
        _check_tensor(lte_score, "lte_score", device, (batch_size,))
        if not lte_score.is_floating_point():
            raise RuntimeError(
                f"exit_head_step: lte_score must be floating point, got {lte_score.dtype}"
            )
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
    return decoded
