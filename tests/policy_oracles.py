"""One-sample reference loops for every exit policy, written from its paper, and the random
examples that compare eeengine with them (used by ``test_policies_oracle.py`` and
``test_triton_exit_head_step.py``).

The oracles use Python floats and lists, one sample at a time, one ``if`` per layer, and share
nothing with ``eeengine.policies``; they compute in fp64, so a random example whose deciding
comparison lies within ``MARGIN`` of its threshold is discarded. :class:`LogitsExecutor` feeds
the runtime's loop exit heads that give back the drawn logits exactly.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume
from hypothesis import strategies as st

from eeengine.executors import LayerExecutor
from eeengine.heads import ExitHead
from eeengine.policies import ExitPolicy, make_policy
from eeengine.runtime import early_exit_forward

MARGIN = 1e-4


def softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def entropy(z: list[float]) -> float:
    """Nats."""
    return -sum(p * math.log(p) for p in softmax(z) if p > 0)


def argmax(z: list[float]) -> int:
    """First index of the maximum."""
    return z.index(max(z))


def threshold_at(params: dict, layer: int) -> float:
    t = params["threshold"]
    return t[layer - 1] if isinstance(t, list) else t


class Comparisons:
    """The comparisons an oracle makes, remembering how close the nearest one came."""

    def __init__(self) -> None:
        self.margin = math.inf

    def _near(self, a: float, b: float) -> None:
        self.margin = min(self.margin, abs(a - b))

    def less(self, a: float, b: float) -> bool:
        self._near(a, b)
        return a < b

    def at_most(self, a: float, b: float) -> bool:
        self._near(a, b)
        return a <= b

    def at_least(self, a: float, b: float, exact: bool = False) -> bool:
        """``exact``: a and b come from identical inputs, so fp32 agrees even when a == b."""
        if not exact:
            self._near(a, b)
        return a >= b


def oracle_entropy(rows, params, cmp, scores):
    for layer, z in enumerate(rows[:-1], 1):
        if cmp.less(entropy(z), threshold_at(params, layer)):
            return layer, z
    return len(rows), rows[-1]


def oracle_normalized_entropy(rows, params, cmp, scores):
    for layer, z in enumerate(rows[:-1], 1):
        if cmp.less(entropy(z) / math.log(len(z)), threshold_at(params, layer)):
            return layer, z
    return len(rows), rows[-1]


def oracle_max_prob(rows, params, cmp, scores):
    for layer, z in enumerate(rows[:-1], 1):
        if cmp.at_least(max(softmax(z)), threshold_at(params, layer)):
            return layer, z
    return len(rows), rows[-1]


def oracle_patience(rows, params, cmp, scores):
    counter, previous = 0, None
    for layer, z in enumerate(rows[:-1], 1):
        if len(z) == 1:
            current = z[0]
            same = previous is not None and cmp.less(
                abs(current - previous), threshold_at(params, layer)
            )
        else:
            current = argmax(z)
            same = previous is not None and current == previous
        counter = counter + 1 if same else 0
        if counter == params["patience"]:
            return layer, z
        previous = current
    return len(rows), rows[-1]


def oracle_pcee(rows, params, cmp, scores):
    counter = 0
    for layer, z in enumerate(rows[:-1], 1):
        if cmp.less(entropy(z) / math.log(len(z)), threshold_at(params, layer)):
            counter += 1
        else:
            counter = 0
        if counter == params["patience"]:
            return layer, z
    return len(rows), rows[-1]


def oracle_elbert(rows, params, cmp, scores):
    n = params.get("window", 2)
    test = params.get("window_test", "monotonic")
    for layer, z in enumerate(rows[:-1], 1):
        if cmp.less(entropy(z) / math.log(len(z)), threshold_at(params, layer)):
            return layer, z
        if layer < n:
            continue
        window = rows[layer - n : layer]  # layers layer-n+1 … layer
        c = argmax(z)
        q = [softmax(w)[c] for w in window]
        if test == "stable":
            steady = all(argmax(w) == c for w in window)
        elif test == "monotonic":
            steady = all(
                cmp.at_least(q[k], q[k - 1], exact=window[k] == window[k - 1]) for k in range(1, n)
            )
        else:
            exact = all(w == window[0] for w in window)
            steady = (
                max(q) - min(q) <= params["window_range"]
                if exact
                else cmp.at_most(max(q) - min(q), params["window_range"])
            )
        if steady:
            return layer, z
    return len(rows), rows[-1]


def oracle_lte(rows, params, cmp, scores):
    for layer, z in enumerate(rows[:-1], 1):
        if cmp.less(scores[layer - 1], threshold_at(params, layer)):
            return layer, z
    return len(rows), rows[-1]


def oracle_mpee(rows, params, cmp, scores):
    weight = params.get("memory_weight", 0.9)
    memory = None
    for layer, z in enumerate(rows, 1):
        if memory is None:
            memory = list(z)
        else:
            memory = [(1 - weight) * m + weight * v for m, v in zip(memory, z, strict=True)]
        if layer == len(rows):
            return layer, memory
        if cmp.less(entropy(memory), threshold_at(params, layer)):
            return layer, memory


def oracle_budget(rows, params, cmp, scores):
    return params["layer"], rows[params["layer"] - 1]


def oracle_none(rows, params, cmp, scores):
    return len(rows), rows[-1]


def thresholds(draw, num_layers, low, high):
    one = st.floats(low, high, allow_nan=False)
    if draw(st.booleans()):
        return draw(one)
    return draw(st.lists(one, min_size=num_layers, max_size=num_layers))


def entropy_params(draw, num_layers, num_labels):
    return {"threshold": thresholds(draw, num_layers, 0.0, math.log(num_labels))}


def unit_params(draw, num_layers, num_labels):
    return {"threshold": thresholds(draw, num_layers, 0.0, 1.0)}


def patience_params(draw, num_layers, num_labels):
    params = {"patience": draw(st.integers(1, 4))}
    if num_labels == 1:
        params["threshold"] = thresholds(draw, num_layers, 0.0, 3.0)
    return params


def pcee_params(draw, num_layers, num_labels):
    return {**unit_params(draw, num_layers, num_labels), "patience": draw(st.integers(1, 4))}


def elbert_params(draw, num_layers, num_labels):
    params = {
        **unit_params(draw, num_layers, num_labels),
        "window": draw(st.integers(2, 4)),
        "window_test": draw(st.sampled_from(["monotonic", "stable", "range"])),
    }
    if params["window_test"] == "range":
        params["window_range"] = draw(st.floats(0.0, 0.5))
    return params


def mpee_params(draw, num_layers, num_labels):
    params = entropy_params(draw, num_layers, num_labels)
    if draw(st.booleans()):
        params["memory_weight"] = draw(st.floats(0.05, 1.0))
    return params


def budget_params(draw, num_layers, num_labels):
    return {"layer": draw(st.integers(1, num_layers))}


def no_params(draw, num_layers, num_labels):
    return {}


CLASSES = (2, 5)


ALL = (1, 2, 5)


CASES = {
    # name: (oracle, params strategy, label counts)
    "entropy": (oracle_entropy, entropy_params, CLASSES),
    "normalized_entropy": (oracle_normalized_entropy, unit_params, CLASSES),
    "max_prob": (oracle_max_prob, unit_params, CLASSES),
    "patience": (oracle_patience, patience_params, ALL),
    "pcee": (oracle_pcee, pcee_params, CLASSES),
    "elbert": (oracle_elbert, elbert_params, CLASSES),
    "lte": (oracle_lte, unit_params, ALL),
    "mpee": (oracle_mpee, mpee_params, CLASSES),
    "budget": (oracle_budget, budget_params, ALL),
    "none": (oracle_none, no_params, ALL),
}


class LogitsModel(torch.nn.Module):
    """Stands in for a :class:`MultiExitBert` in the runtime's loop
    (:class:`eeengine.runtime.ExitLoop`): every layer has the same real :class:`ExitHead`
    (mean pooling, a classifier that copies the first C of C + 2 components, so one token's
    hidden state [logits | lte_score | row] gives back its logits exactly), and the LTE score is
    read from component C."""

    def __init__(self, num_layers: int, num_labels: int) -> None:
        super().__init__()
        self.num_layers, self.num_labels = num_layers, num_labels
        self.head = ExitHead(num_labels + 2, num_labels, "mean", dropout=0.0)
        with torch.no_grad():
            self.head.classifier.weight.copy_(torch.eye(num_labels, num_labels + 2))
            self.head.classifier.bias.zero_()
        self.eval()

    def exit_head(self, index: int) -> ExitHead:
        return self.head

    def lte(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled[:, self.num_labels]


class LogitsExecutor(LayerExecutor):
    """A layer executor that plays back drawn logits: after layer l, row b is one token
    [logits[l][b] | lte_score[l][b] | b]. The row index travels in the hidden state, so the
    runtime's own compaction decides which rows reach each layer."""

    name = "logits"

    def __init__(self, all_logits: torch.Tensor, scores: torch.Tensor) -> None:
        self.all_logits, self.scores = all_logits, scores

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.zeros(input_ids.shape[0], 1, self.all_logits.shape[-1] + 2)
        hidden_states[:, 0, -1] = input_ids[:, 0]
        return hidden_states

    def mask(self, attention_mask: torch.Tensor) -> None:
        return None

    def layer(self, index: int, hidden_states: torch.Tensor, mask: None) -> torch.Tensor:
        rows = hidden_states[:, 0, -1].long()
        values = [self.all_logits[index, rows], self.scores[index, rows, None], rows[:, None]]
        return torch.cat([v.float() for v in values], 1)[:, None]


def run_runtime(policy, all_logits, signals, backend="reference"):
    """The runtime's early-exit loop (:func:`early_exit_forward`: exited rows leave the batch
    and the policy state) on the drawn logits, one row per sample of one token, with the exit
    step of ``backend``."""
    num_layers, batch_size, num_labels = all_logits.shape
    scores = signals.get("lte_score", torch.zeros(num_layers, batch_size))
    input_ids = torch.arange(batch_size)[:, None]
    out = early_exit_forward(
        LogitsModel(num_layers, num_labels),
        policy,
        input_ids,
        torch.ones_like(input_ids),
        torch.zeros_like(input_ids),
        backend=backend,
        executor=LogitsExecutor(all_logits, scores),
    )
    return out.exit_layer, out.logits


def _per_layer_and_row(
    element: st.SearchStrategy, num_layers: int, batch_size: int
) -> st.SearchStrategy:
    """Lists [num_layers][batch_size] of ``element``."""
    rows = st.lists(element, min_size=batch_size, max_size=batch_size)
    return st.lists(rows, min_size=num_layers, max_size=num_layers)


def draw_case(
    data: st.DataObject, name: str, max_layers: int = 12, max_batch: int = 8
) -> tuple[ExitPolicy, torch.Tensor, dict[str, torch.Tensor], list[int], list[list[float]]]:
    """A random example of policy ``name`` and its oracle's answer.

    Returns:
        (policy, all_logits (L, B, C), signals, expected exit layers, expected logits).
    """
    oracle, params_strategy, label_counts = CASES[name]
    num_layers = data.draw(st.integers(2, max_layers), label="L")
    batch_size = data.draw(st.integers(1, max_batch), label="B")
    num_labels = data.draw(st.sampled_from(label_counts), label="C")
    value = st.floats(-6.0, 6.0, allow_nan=False, width=32)
    row = st.lists(value, min_size=num_labels, max_size=num_labels)
    logits = data.draw(_per_layer_and_row(row, num_layers, batch_size), label="logits[L][B][C]")
    params = params_strategy(data.draw, num_layers, num_labels)
    signals, scores = {}, None
    if name == "lte":
        score = st.floats(0.0, 1.0, width=32)
        scores = data.draw(
            _per_layer_and_row(score, num_layers, batch_size), label="lte_score[L][B]"
        )
        signals = {"lte_score": torch.tensor(scores)}

    policy = make_policy(name, **params)
    policy.validate(num_labels, num_layers, signals=signals.keys())
    expected_layer, expected_out = [], []
    for b in range(batch_size):
        cmp = Comparisons()
        sample_scores = None if scores is None else [scores[i][b] for i in range(num_layers)]
        layer, out = oracle([logits[i][b] for i in range(num_layers)], params, cmp, sample_scores)
        assume(cmp.margin > MARGIN)
        expected_layer.append(layer)
        expected_out.append(out)
    return policy, torch.tensor(logits), signals, expected_layer, expected_out
