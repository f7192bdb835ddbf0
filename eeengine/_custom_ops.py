"""Typed Python wrappers over eeengine's C++ ops (``torch.ops.eeengine.*``), and the backend choice.

The ops live in the compiled extension ``eeengine._C`` (sources in ``csrc/``, built by
``pip install -e . --no-build-isolation``). The extension is optional: without it ``HAS_C`` is
False, :func:`resolve_backend` picks the plain-torch reference and warns once, and calling an op
raises.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from eeengine.policy_codes import REGRESSION_CODES
from eeengine.token_pruning import TokenPruneOutput, pruned_length, token_prune_reference

BACKENDS = ("reference", "cpp", "triton", "cuda")
# The fused backends of each device type, in the order resolve_backend tries them.
DEVICE_BACKENDS = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}


def _load_extension() -> str | None:
    """Load ``eeengine._C`` into ``torch.ops``; return why it failed, or None."""
    spec = importlib.util.find_spec("eeengine._C")
    if spec is None or spec.origin is None:
        return "the extension eeengine._C is not built (pip install -e . --no-build-isolation)"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:
        return f"the extension eeengine._C failed to load: {error}"
    return None


LOAD_ERROR: str | None = _load_extension()
HAS_C: bool = LOAD_ERROR is None


def exit_head_step(
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
    """Exit head, exit policy step and latch of exiting rows, fused (one pass per row).

    Computes, in fp32 whatever the input dtype, ``logits = mean_pool(hidden_states,
    attention_mask) @ weight.T + bias`` (as :class:`eeengine.heads.ExitHead` in eval mode), then
    the policy's exit rule at ``layer`` (as the policy's ``step`` in :mod:`eeengine.policies`;
    see :mod:`eeengine.policy_codes`). A row at ``layer == num_layers`` always exits. For every
    exiting row i: ``out_logits[rows[i]] = logits[i]`` (MPEE: its classifier memory, the
    policy's ``output_logits``) and ``out_layer[rows[i]] = layer``.

    Args:
        hidden_states: (batch_size, seq_len, hidden_size), mean-pooled over the mask inside, or
            already pooled (batch_size, hidden_size) (e.g. by a [CLS] pooler); float32, float16
            or bfloat16.
        attention_mask: (batch_size, seq_len), 1 for real tokens, 0 for padding; any dtype.
            None exactly when ``hidden_states`` is pooled.
        weight: (num_labels, hidden_size), the head's linear weight.
        bias: (num_labels,).
        policy: a :class:`eeengine.policy_codes.PolicyCode`.
        params: the policy's scalar parameters at this layer (the policy's ``op_params``), see
            :mod:`eeengine.policy_codes`.
        layer: 1-based index of the layer whose hidden states these are.
        num_layers: depth of the model.
        state: the policy's state tensors (the policy's ``op_state_keys`` of its state),
            contiguous, dtypes and shapes per :func:`eeengine.policy_codes.state_specs`;
            updated in place.
        rows: (batch_size,) int64, each live row's index into ``out_logits`` / ``out_layer``.
        out_logits: (batch_size_0, num_labels) float32 contiguous, written in place.
        out_layer: (batch_size_0,) int64, written in place.
        lte_score: (batch_size,) float, the LTE module's score s_l; given for policy ``LTE``
            and only for it.

    Returns:
        logits: (batch_size, num_labels) float32.
        exit_mask: (batch_size,) bool, True for rows that exit at this layer.

    Raises:
        RuntimeError: the extension is not loaded (``HAS_C`` is False), or an argument has the
            wrong shape, dtype or device, or a parameter is out of range (the message names it).
    """
    return torch.ops.eeengine.exit_head_step(
        hidden_states,
        attention_mask,
        weight,
        bias,
        int(policy),
        [float(p) for p in params],
        layer,
        num_layers,
        state,
        rows,
        out_logits,
        out_layer,
        lte_score,
    )


def exit_head_step_fake(
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
    """Fake (meta) implementation of every backend of exit_head_step: output shapes only."""
    batch_size = hidden_states.shape[0]
    logits = hidden_states.new_empty((batch_size, weight.shape[0]), dtype=torch.float32)
    exit_mask = hidden_states.new_empty((batch_size,), dtype=torch.bool)
    return logits, exit_mask


if HAS_C:
    torch.library.register_fake("eeengine::exit_head_step")(exit_head_step_fake)


def token_prune(
    hidden_states: Tensor,
    attention_mask: Tensor,
    cls_query: Tensor,
    key: Tensor,
    memory: Tensor,
    keep_ratio: float,
    beta: float,
) -> TokenPruneOutput:
    """MPEE token pruning at one layer, fused: [CLS] attention row, memory update, top-k keep,
    gather, fusion token (Kong et al. 2022, eqs. 5-8). Same rule, fusion weights and
    tie-breaking as :func:`eeengine.token_pruning.token_prune_reference` (see
    :mod:`eeengine.token_pruning`); fp32 math whatever the input dtype. Inference only (no
    autograd).

    Args:
        hidden_states: (batch_size, seq_len, hidden_size) float32, float16 or bfloat16, the
            attention sublayer's output; [CLS] at position 0.
        attention_mask: (batch_size, seq_len), 1 for real tokens; any dtype.
        cls_query: (batch_size, num_heads, head_size), the [CLS] query; hidden_states' dtype.
        key: (batch_size, num_heads, seq_len, head_size), the layer's keys; hidden_states'
            dtype. Strided views (SDPA's head layout) are read in place.
        memory: (batch_size, seq_len - 1) float32, the class-attention memory m_{l-1}.
        keep_ratio: r in [0, 1]; each row keeps ceil(r * c) of its c real non-[CLS] tokens.
        beta: β_l in [0, 1], m_l = (1 - β_l) m_{l-1} + β_l a_l.

    Returns:
        :class:`eeengine.token_pruning.TokenPruneOutput` of width
        ``pruned_length(seq_len, keep_ratio)``.

    Raises:
        RuntimeError: the extension is not loaded (``HAS_C`` is False), or an argument has the
            wrong shape, dtype or device, or is out of range (the message names it).
    """
    return TokenPruneOutput(
        *torch.ops.eeengine.token_prune(
            hidden_states, attention_mask, cls_query, key, memory, float(keep_ratio), float(beta)
        )
    )


def token_prune_fake(
    hidden_states: Tensor,
    attention_mask: Tensor,
    cls_query: Tensor,
    key: Tensor,
    memory: Tensor,
    keep_ratio: float,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (meta) implementation of every backend of token_prune: output shapes only (the
    width ``pruned_length(seq_len, keep_ratio)`` is static)."""
    batch_size, seq_len, hidden_size = hidden_states.shape
    out_len = pruned_length(seq_len, keep_ratio)
    return (
        hidden_states.new_empty((batch_size, out_len, hidden_size)),
        attention_mask.new_empty((batch_size, out_len)),
        memory.new_empty((batch_size, out_len - 1)),
        hidden_states.new_empty((batch_size, out_len), dtype=torch.long),
    )


if HAS_C:
    torch.library.register_fake("eeengine::token_prune")(token_prune_fake)


_warned: set[str] = set()  # reasons already warned about: one warning each per process


def _unavailable(backend: str, policy: object, num_labels: int) -> str | None:
    """Why the fused ``backend`` cannot run ``policy`` with ``num_labels`` classes, or None."""
    op_code = getattr(policy, "op_code", None)
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    elif not HAS_C:
        return LOAD_ERROR
    elif backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "eeengine::exit_head_step", "CUDA"
    ):
        return "eeengine._C was built without CUDA kernels (that needs a CUDA torch and nvcc)"
    if op_code is None:
        return f"the fused exit op does not implement policy {getattr(policy, 'name', policy)!r}"
    if num_labels < 2 and op_code not in REGRESSION_CODES:
        return f"the fused exit op needs >= 2 classes for policy {policy.name!r} (regression)"
    return None


def resolve_backend(
    requested: str | None, policy: object, num_labels: int, device: torch.device | str = "cpu"
) -> str:
    """Pick the backend of the exit step once, at engine construction.

    Fused backends by device, fastest first: CPU "cpp" (the C++ op); CUDA "triton" (the Triton
    kernel, primary) then "cuda" (the CUDA C++ kernel, in extensions built against a CUDA
    torch). "reference" (plain torch) runs everywhere.

    Args:
        requested: a name of :data:`BACKENDS`, or None for the first fused backend of the device
            that can run the policy, else "reference" with one warning that says why.
        policy: an :class:`eeengine.policies.ExitPolicy`; the op implements the policies whose
            ``op_code`` is not None.
        num_labels: the model's number of classes C; policies that read the softmax need C >= 2
            in the op (regression, C = 1, runs on the reference).
        device: where the model runs.

    Returns:
        One of :data:`BACKENDS`.

    Raises:
        ValueError: an unknown backend, a backend for another device, or one requested where it
            cannot run (the message says why).
    """
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; available: {', '.join(BACKENDS)}")
    if requested == "reference":
        return "reference"
    device_type = torch.device(device).type
    fused = DEVICE_BACKENDS.get(device_type, ())
    if requested is not None and requested not in fused:
        raise ValueError(
            f"backend {requested!r} does not run on {device_type} devices; there: "
            f"{', '.join((*fused, 'reference'))}"
        )
    reasons = []
    for backend in [requested] if requested is not None else fused:
        reason = _unavailable(backend, policy, num_labels)
        if reason is None:
            return backend
        reasons.append(reason)
    reason = "; ".join(reasons) or f"no fused exit op runs on {device_type} devices"
    if requested is not None:
        raise ValueError(f"backend {requested!r} is not available: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"eeengine: using the plain-torch reference backend (slower): {reason}", stacklevel=2
        )
    return "reference"


def fused_op(backend: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The fused exit step of a backend other than "reference": :func:`exit_head_step` for
    "cpp" and "cuda" (the dispatcher picks the kernel by device), the Triton op for "triton"
    (imported here, so CPU-only installs never import triton). Same signature for all."""
    if backend == "triton":
        from eeengine.kernels.exit_head_step import exit_head_step_triton

        return exit_head_step_triton
    return exit_head_step


def prune_op(backend: str) -> Callable[..., TokenPruneOutput]:
    """The token_prune of a backend, all with :func:`token_prune`'s signature and returns:
    :func:`eeengine.token_pruning.token_prune_reference` (plain torch) for "reference", the C++
    op for "cpp", the Triton op (``eeengine.kernels.token_prune.token_prune``) for the GPU
    backends "triton" and "cuda" (imported here, so CPU-only installs never import triton; the
    CUDA C++ kernels do not include token_prune, so "cuda" without triton gets the reference)."""
    if backend == "triton" or (backend == "cuda" and importlib.util.find_spec("triton")):
        from eeengine.kernels.token_prune import token_prune as token_prune_gpu

        return token_prune_gpu
    if backend == "cpp":
        return token_prune
    return token_prune_reference


def seeded_dropout(input: Tensor, p: float, seed: int) -> Tensor:
    """Inverted dropout with a mask that is a pure function of ``(seed, flat index)``, fused
    (one parallel pass; the rule is in csrc/seeded_dropout.cpp and
    :func:`eeengine.dropout.seeded_dropout_reference`). The same seed gives the same mask, so
    the gradient of the output is this op on the output's gradient, with the same seed.

    Args:
        input: any shape, float32, float16 or bfloat16, on the CPU.
        p: drop probability in [0, 1] (applied as ``round(p * 65536) / 65536``).
        seed: any int64.

    Returns:
        Contiguous, ``input``'s shape and dtype: dropped elements 0, kept ones scaled by
        ``1 / (1 - p)``.

    Raises:
        RuntimeError: the extension is not loaded, ``input`` is not on the CPU or not floating
            point, or ``p`` is outside [0, 1].
    """
    return torch.ops.eeengine.seeded_dropout(input, float(p), int(seed))


if HAS_C:
    torch.library.register_fake("eeengine::seeded_dropout")(
        lambda input, p, seed: torch.empty_like(input, memory_format=torch.contiguous_format)
    )
