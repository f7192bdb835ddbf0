"""The FLOPs formula (:class:`eeengine.flops.FlopCounter`) against torch's own count,
``torch.utils.flop_counter.FlopCounterMode``, of a real forward pass of the early-exit loop
(:func:`eeengine.runtime.early_exit_forward`, reference backend) on a tiny random model, one
row of ``LENGTH`` tokens (no padding, as the formula counts a sample at its real length).

Both count 2 FLOPs per multiply-accumulate (FlopCounterMode: 2·m·k·n for an (m×k)·(k×n)
product). FlopCounterMode counts matrix products only (mm, addmm, bmm; attention through
SDPA's math backend, since the fused CPU kernel has no FLOPs formula). The terms both count:

- Q, K, V and output projections 8·n·H², attention scores Q·Kᵀ and context P·V 4·n²·H;
- feed-forward 4·n'·H·I;
- the classifier of every exit head the row ran, 2·H·C each (flops.py counts one at every layer
  the row ran, as the papers do; ``none`` and ``budget`` skip the heads before their layer).

What flops.py counts differently, subtracted or added by hand below:

- mean pooling, n'·H per exit head: an elementwise sum here, not seen by FlopCounterMode;
- token pruning's [CLS] attention row, 2·n·H per pruning layer: an elementwise product and sum
  (``cls_attention``), not seen;
- the fusion token: flops.py counts 2·p·H for the p dropped tokens; the reference prune computes
  it as one product over all n − 1 non-[CLS] tokens (weight 0 on the kept ones), which
  FlopCounterMode counts as 2·(n − 1)·H.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eeengine.flops import FlopCounter
from eeengine.policies import make_policy
from eeengine.runtime import ExitOutput, early_exit_forward
from eeengine.token_pruning import TokenPruning, num_kept
from tests.conftest import make_tiny_model

LENGTH = 13


@pytest.fixture
def model(tiny_bert_dir):
    return make_tiny_model(tiny_bert_dir)


def _row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1000, 30000, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    return input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids)


def _count(
    model, exit_layer: int, token_pruning: TokenPruning | None, policy=None
) -> tuple[int, ExitOutput]:
    """FlopCounterMode's total for the loop run to ``exit_layer``, and the loop's output. The
    default policy runs the exit head at every layer and exits at ``exit_layer``: normalized
    entropy below 0 (never) before it, below 1 (a random head's logits: always) from it on."""
    if policy is None:
        thresholds = [0.0] * (exit_layer - 1) + [1.0] * (model.num_layers - exit_layer + 1)
        policy = make_policy("normalized_entropy", threshold=thresholds)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as mode:
        out = early_exit_forward(model, policy, *_row(), token_pruning=token_pruning)
    assert out.exit_layer.tolist() == [exit_layer]
    return mode.get_total_flops(), out


@pytest.mark.parametrize("exit_layer", [1, 2, 4])  # 4: full depth
def test_formula_counts_the_matmuls_the_loop_runs(model, exit_layer):
    counter = FlopCounter.for_model(model)
    hidden_size = model.config.hidden_size
    flops, _ = _count(model, exit_layer, None)
    mean_pooling = exit_layer * LENGTH * hidden_size
    assert flops == counter.executed(LENGTH, exit_layer, None) - mean_pooling
    assert flops > 0


@pytest.mark.parametrize("exit_layer", [2, 4])
def test_budget_runs_one_head(model, exit_layer):
    """``budget`` (and ``none``) need no logits before their layer, so the loop runs only the
    exit head there: the formula less the classifiers (2·H·C each) of the heads it skipped."""
    counter = FlopCounter.for_model(model)
    hidden_size, num_labels = model.config.hidden_size, model.num_labels
    policy = make_policy("budget", layer=exit_layer)
    flops, _ = _count(model, exit_layer, None, policy)
    skipped_classifiers = (exit_layer - 1) * 2 * hidden_size * num_labels
    mean_pooling = exit_layer * LENGTH * hidden_size
    expected = counter.executed(LENGTH, exit_layer, None) - mean_pooling - skipped_classifiers
    assert flops == expected


def test_full_model_is_every_layer_and_one_head(model):
    counter = FlopCounter.for_model(model)
    input_ids, attention_mask, token_type_ids = _row()
    head = model.exit_head(model.num_layers - 1)
    with (
        torch.inference_mode(),
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as mode,
    ):
        hidden_states = model.backbone(input_ids, attention_mask, token_type_ids)[-1]
        head(hidden_states, attention_mask)
    mean_pooling = LENGTH * model.config.hidden_size
    assert mode.get_total_flops() == counter.full(LENGTH) - mean_pooling


@pytest.mark.parametrize("exit_layer", [2, 4])
def test_formula_counts_the_tokens_pruning_leaves(model, exit_layer):
    schedule = TokenPruning(layers=(1, 3), keep_ratio=0.5, beta=(1.0, 0.5))
    counter = FlopCounter.for_model(model)
    hidden_size = model.config.hidden_size
    flops, out = _count(model, exit_layer, schedule)
    tokens = out.tokens_kept[0, :exit_layer].tolist()  # what each layer's feed-forward ran on
    assert tokens == schedule.tokens_per_layer(LENGTH, model.num_layers)[:exit_layer]
    assert tokens[-1] < LENGTH  # tokens were dropped
    expected = counter.executed(LENGTH, exit_layer, schedule) - sum(tokens) * hidden_size
    for layer, tokens_in in enumerate([LENGTH, *tokens[:-1]], start=1):
        if layer in schedule.layers:
            dropped = tokens_in - 1 - num_kept(tokens_in - 1, schedule.keep_ratio)
            cls_row, fusion = 2 * tokens_in * hidden_size, 2 * dropped * hidden_size
            expected += -cls_row - fusion + 2 * (tokens_in - 1) * hidden_size
    assert flops == expected
