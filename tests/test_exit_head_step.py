"""The fused C++ op exit_head_step against its plain-torch twin (eeengine.runtime.
exit_head_step_reference: ExitHead + the policy's step + latch).

Logits are compared with one per-dtype tolerance table; exit masks, policy state and latched
exit layers must be exactly equal. Thresholds are placed midway between two of the reference's
signal values, so a last-bit rounding difference cannot flip a decision.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine._custom_ops import HAS_C, LOAD_ERROR, exit_head_step, resolve_backend
from eeengine.heads import ExitHead
from eeengine.policies.base import ExitPolicy, run_policy
from eeengine.policies.elbert import ElbertPolicy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policies.lte import LtePolicy
from eeengine.policies.mpee import MpeePolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.normalized_entropy import NormalizedEntropyPolicy
from eeengine.policies.patience import PatiencePolicy
from eeengine.policies.pcee import PceePolicy
from eeengine.policy_codes import PolicyCode
from eeengine.runtime import early_exit_forward
from tests.exit_step_cases import (
    BAD_ARGS,
    BATCH_SIZES,
    DTYPES,
    GOOD_POLICY_ARGS,
    HIDDEN_SIZES,
    NUM_LABELS,
    NUM_LAYERS,
    POLICIES,
    POLICY_BAD_ARGS,
    SCENARIOS,
    SEED,
    STATEFUL_POLICIES,
    TOLERANCES,
    WINDOW_TESTS,
    WINDOWS,
    assert_same,
    check_argmax_ties,
    check_elbert_window,
    check_patience_regression,
    check_state_over_layers,
    good_args,
    make_inputs,
    make_policy,
    policy_case,
    run_both,
    tiny_model,
)

requires_c = pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")


# Whether the extension was built with CUDA kernels (asks the dispatcher; no GPU needed).
HAS_CUDA_KERNEL = HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(
    "eeengine::exit_head_step", "CUDA"
)


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", POLICIES)
@torch.inference_mode()
def test_policies_match_reference(name: str, scenario: str, dtype: torch.dtype) -> None:
    head, hidden, mask, gen = make_inputs(13, 9, 83, 3, dtype)
    layer = 3
    policy, state = policy_case(name, scenario, head, hidden, mask, layer, gen)
    ref, got = run_both(head, policy, hidden, mask, layer, state, gen)
    assert_same(ref, got, dtype)
    expected = {"all": 13, "none": 0}.get(scenario)
    if name == "none":
        expected = 0
    if expected is not None:
        assert int(got[1].sum()) == expected
    elif name not in ("budget",):
        assert 0 < int(got[1].sum()) < 13, "scenario 'some' should split the batch"


@requires_c
@pytest.mark.parametrize("name", STATEFUL_POLICIES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_labels", NUM_LABELS)
@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_shapes_match_reference(
    dtype: torch.dtype, hidden_size: int, num_labels: int, batch_size: int, name: str
) -> None:
    head, hidden, mask, gen = make_inputs(batch_size, 11, hidden_size, num_labels, dtype)
    policy, state = policy_case(name, "some", head, hidden, mask, 2, gen)
    ref, got = run_both(head, policy, hidden, mask, 2, state, gen)
    assert_same(ref, got, dtype)


@requires_c
@pytest.mark.parametrize("test", WINDOW_TESTS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layer_offset", [-1, 0, 1])  # before, at and after the window fills
@torch.inference_mode()
def test_elbert_window_lengths(test: str, window: int, layer_offset: int) -> None:
    check_elbert_window(test, window, layer_offset, exit_head_step)


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("layer", [1, 3])
@torch.inference_mode()
def test_patience_regression_matches_reference(
    layer: int, scenario: str, dtype: torch.dtype
) -> None:
    check_patience_regression(layer, scenario, dtype, exit_head_step)


@requires_c
@pytest.mark.parametrize("name", ["patience", "elbert_stable", "elbert_monotonic"])
@torch.inference_mode()
def test_argmax_ties_take_the_first_class(name: str) -> None:
    check_argmax_ties(name, exit_head_step)


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("repeat", [False, True], ids=["random", "repeated"])
@pytest.mark.parametrize("name", STATEFUL_POLICIES)
@torch.inference_mode()
def test_state_over_layers_matches_reference(name: str, repeat: bool, dtype: torch.dtype) -> None:
    check_state_over_layers(name, repeat, dtype, exit_head_step)


@requires_c
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_low_precision_error_at_most_twice_torch(dtype: torch.dtype) -> None:
    """FlashAttention's rule: error vs fp32 on the original inputs <= 2x torch's own in dtype."""
    head, hidden32, mask, gen = make_inputs(13, 17, 384, 3, torch.float32)
    exact = head(hidden32, mask)
    torch_err = (head.to(dtype)(hidden32.to(dtype), mask.to(dtype)).float() - exact).abs().max()
    head = head.float()
    logits, _ = exit_head_step(
        hidden32.to(dtype), mask, head.classifier.weight, head.classifier.bias, PolicyCode.NONE,
        [], 1, NUM_LAYERS, [], torch.arange(13), torch.zeros(13, 3),
        torch.zeros(13, dtype=torch.long),
    )  # fmt: skip
    assert (logits - exact).abs().max() <= 2 * torch_err


@requires_c
@pytest.mark.parametrize("name", POLICIES)
@torch.inference_mode()
def test_last_layer_every_row_exits(name: str) -> None:
    head, hidden, mask, gen = make_inputs(13, 9, 83, 3, torch.float32)
    policy, state = policy_case(name, "none", head, hidden, mask, NUM_LAYERS, gen)
    ref, got = run_both(head, policy, hidden, mask, NUM_LAYERS, state, gen)
    assert bool(got[1].all())
    assert_same(ref, got, torch.float32)


@requires_c
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32])
@torch.inference_mode()
def test_padding_and_mask_dtypes(mask_dtype: torch.dtype) -> None:
    head, hidden, mask, gen = make_inputs(5, 8, 83, 2, torch.float32)
    mask[1:, 3:] = 0  # heavy padding
    mask[2, :] = 0  # a row with no real token: the reference divides by clamp_min(1)
    ref_logits = head(hidden, mask)
    policy, state = make_policy("entropy", "some", ref_logits, 1, gen)
    ref, got = run_both(head, policy, hidden, mask.to(mask_dtype), 1, state, gen)
    assert_same(ref, got, torch.float32)


@requires_c
@torch.inference_mode()
def test_strided_inputs() -> None:
    """Batch/sequence slices (as the runtime's compaction makes) and a strided hidden dim."""
    head, hidden, mask, gen = make_inputs(9, 12, 83, 3, torch.float32)
    sliced, sliced_mask = hidden[1::2, :10], mask[1::2, :10]
    wide = torch.randn(4, 10, 166, generator=gen)[..., ::2]
    for h, m in ((sliced, sliced_mask), (wide, sliced_mask[:4])):
        assert not h.is_contiguous()
        ref_logits = head(h, m)
        policy, state = make_policy("max_prob", "some", ref_logits, 2, gen)
        ref, got = run_both(head, policy, h, m, 2, state, gen)
        assert_same(ref, got, torch.float32)


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_pooled_input_matches_cls_head(dtype: torch.dtype) -> None:
    """[CLS]+dense+tanh pooling runs in torch; the op takes the pooled (batch, hidden) rows."""
    head, hidden, mask, gen = make_inputs(7, 5, 83, 5, torch.float32)
    cls_head = ExitHead(83, 5, "cls", dropout=0.1).eval()
    pooled = cls_head.pool(hidden, mask).to(dtype)
    policy, state = make_policy("patience", "some", head.classifier(pooled.float()), 2, gen)
    ref, got = run_both(head, policy, pooled, None, 2, state, gen)
    assert_same(ref, got, dtype)


@requires_c
def test_batch_of_zero_rows() -> None:
    logits, exit_mask = exit_head_step(
        torch.randn(0, 3, 8), torch.ones(0, 3), torch.randn(2, 8), torch.randn(2),
        PolicyCode.ENTROPY, [0.5], 1, NUM_LAYERS, [], torch.zeros(0, dtype=torch.long),
        torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
    )  # fmt: skip
    assert logits.shape == (0, 2) and exit_mask.shape == (0,)


@requires_c
@pytest.mark.parametrize(("arg", "value", "message"), BAD_ARGS)
def test_bad_arguments_are_named(arg: str, value: object, message: str) -> None:
    exit_head_step(**good_args())  # the good arguments pass
    args = good_args()
    args[arg] = value
    with pytest.raises(RuntimeError, match=message):
        exit_head_step(**args)


@requires_c
@pytest.mark.parametrize(("args", "message"), POLICY_BAD_ARGS)
def test_bad_policy_arguments_are_named(args: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        exit_head_step(**args)


@requires_c
@pytest.mark.parametrize("name", GOOD_POLICY_ARGS)
def test_opcheck(name: str) -> None:
    args = GOOD_POLICY_ARGS[name]()
    if name == "pcee":
        args["params"] = [0.9, 1.0]
    torch.library.opcheck(torch.ops.eeengine.exit_head_step.default, tuple(args.values()))


@requires_c
def test_torch_compile_fullgraph() -> None:
    head, hidden, mask, _ = make_inputs(4, 6, 16, 3, torch.float32)
    weight, bias = head.classifier.weight.detach(), head.classifier.bias.detach()

    def step(hidden: Tensor, counter: Tensor, out_logits: Tensor, out_layer: Tensor) -> Tensor:
        _, exit_mask = exit_head_step(
            hidden * 1.0, mask, weight, bias, PolicyCode.PCEE, [0.99, 1.0], 2, NUM_LAYERS,
            [counter], torch.arange(4), out_logits, out_layer,
        )  # fmt: skip
        return exit_mask

    buffers = [(torch.zeros(4, dtype=torch.long), torch.zeros(4, 3), torch.zeros(4).long())]
    buffers.append(tuple(t.clone() for t in buffers[0]))
    expected = step(hidden, *buffers[0])
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(hidden, *buffers[1]), expected)
    for eager, traced in zip(*buffers, strict=True):  # the in-place updates happened too
        assert torch.equal(traced, eager)
    assert int(buffers[1][0].sum()) > 0


RUNTIME_POLICIES = [
    (EntropyPolicy(0.6), 3),
    (NormalizedEntropyPolicy(0.5), 3),
    (PceePolicy(0.6, 2), 3),
    (NoExitPolicy(), 3),
    (PatiencePolicy(patience=1), 3),
    (ElbertPolicy(0.2, 2), 3),
    (ElbertPolicy(0.2, 3, "stable"), 3),
    (ElbertPolicy(0.2, 2, "range", 0.2), 2),
    (MpeePolicy(0.6, 0.9), 3),
    (LtePolicy(0.5), 3),
    (PatiencePolicy(10.0, patience=1), 1),  # regression: δ in the heads' units
    (LtePolicy(0.5), 1),
]


@requires_c
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize(
    ("policy", "num_labels"),
    RUNTIME_POLICIES,
    ids=[f"{p.name}-{getattr(p, 'window_test', '')}-C{c}" for p, c in RUNTIME_POLICIES],
)
def test_runtime_cpp_backend_matches_reference(
    pooling: str, policy: ExitPolicy, num_labels: int
) -> None:
    model = tiny_model(pooling, num_labels, lte=policy.name == "lte")
    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(1, 50, (8, 10), generator=gen)
    lengths = torch.randint(3, 11, (8,), generator=gen)
    attention_mask = (torch.arange(10) < lengths[:, None]).long()
    batch = (input_ids * attention_mask, attention_mask, torch.zeros_like(input_ids))
    ref = early_exit_forward(model, policy, *batch, backend="reference")
    got = early_exit_forward(model, policy, *batch, backend="cpp")
    with torch.inference_mode():  # both equal the policy's definition on full-depth logits
        exit_layer, logits = run_policy(policy, *model.exits(*batch))
    assert torch.equal(ref.exit_layer, exit_layer)
    torch.testing.assert_close(ref.logits, logits, **TOLERANCES[torch.float32])
    assert torch.equal(got.exit_layer, ref.exit_layer)
    torch.testing.assert_close(got.logits, ref.logits, **TOLERANCES[torch.float32])
    if policy.name != "none":
        assert int(ref.exit_layer.min()) < NUM_LAYERS, "no row exits early: weak test"


def test_resolve_backend() -> None:
    policy = EntropyPolicy(0.5)
    assert resolve_backend("reference", policy, 2) == "reference"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        resolve_backend("gpu", policy, 2)


@requires_c
def test_resolve_backend_picks_the_cpp_op_on_cpu() -> None:
    policy = EntropyPolicy(0.5)
    assert resolve_backend(None, policy, 2) == "cpp"
    assert resolve_backend("cpp", policy, 2) == "cpp"
    assert _custom_ops.fused_op("cpp") is exit_head_step


def test_resolve_backend_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA devices try "triton" (primary) then "cuda"; CPU backends are refused there."""
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    with pytest.raises(ValueError, match="backend 'triton' does not run on cpu devices"):
        resolve_backend("triton", policy, 2, "cpu")
    with pytest.raises(ValueError, match="backend 'cpp' does not run on cuda devices"):
        resolve_backend("cpp", policy, 2, "cuda")
    assert resolve_backend("reference", policy, 2, "cuda") == "reference"
    monkeypatch.setattr(_custom_ops.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="triton is not installed"):
        resolve_backend("triton", policy, 2, "cuda")


@pytest.mark.skipif(HAS_CUDA_KERNEL, reason="eeengine._C has CUDA kernels: 'cuda' is available")
def test_resolve_backend_without_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """No "cuda" backend, and without triton no fused op at all on CUDA devices."""
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        resolve_backend("cuda", policy, 2, "cuda")
    monkeypatch.setattr(_custom_ops.importlib.util, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match="triton is not installed; .*without CUDA kernels"):
        assert resolve_backend(None, policy, 2, "cuda") == "reference"


def test_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_custom_ops, "HAS_C", False)
    monkeypatch.setattr(_custom_ops, "LOAD_ERROR", "the extension eeengine._C is not built")
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    with pytest.warns(UserWarning, match="reference backend .*not built"):
        assert resolve_backend(None, policy, 2) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(None, policy, 2) == "reference"  # no second warning
    with pytest.raises(ValueError, match="backend 'cpp' is not available: .*not built"):
        resolve_backend("cpp", policy, 2)


def test_unsupported_policy_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    monkeypatch.setattr(policy, "op_code", None)
    with pytest.warns(UserWarning, match="reference backend"):
        assert resolve_backend(None, policy, 2) == "reference"
    with pytest.raises(ValueError, match="backend 'cpp' is not available"):
        resolve_backend("cpp", policy, 2)


@requires_c
def test_regression_and_training_mode_refuse_cpp() -> None:
    with pytest.raises(ValueError, match="needs >= 2 classes"):
        resolve_backend("cpp", PceePolicy(0.5, 2), 1)
    assert resolve_backend("cpp", NoExitPolicy(), 1) == "cpp"
    model = tiny_model("mean").train()
    ones = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="model.eval"):
        early_exit_forward(model, NoExitPolicy(), ones, ones, ones * 0, backend="cpp")
