"""One row's whole early-exit loop as one ONNX graph: layers, exit heads, policy steps and the
exits themselves (``If`` nodes), so a batch of one runs in one ONNX Runtime call.

Between two layers, the compaction loop (:class:`eeengine.runtime.ExitLoop`) returns to
Python, runs the fused exit step through torch's dispatcher and checks the exit on the host.
At batch 1 that is most of the time that is not GEMMs: each layer's weights (1.8 MB at int8,
7 MB at fp32 for MiniLM) evict the interpreter's and the dispatcher's code and data from the
core's 2 MB L2, so the first torch op after a layer costs 40-60 us instead of 8
(BENCHMARKS.md, "Batch 1 in one session"). Here the decision stays inside ONNX Runtime:

    hidden_0 = embeddings(input_ids, token_type_ids)
    hidden_1 = layer_1(hidden_0, mask); logits, state, exit = head_1 + step_1
    If exit: (output_logits_1, 1)
    else:    hidden_2 = layer_2(hidden_1, mask); ... If exit: (output_logits_2, 2) else: ...

A layer where the policy cannot exit (:meth:`ExitPolicy.decides_at` False) has no head, step
or ``If``. The layers are the executor's own graphs (its precision); the heads are plain ONNX
(mean pooling or the [CLS] pooler, then the classifier, fp32); each policy step is the policy's
own :meth:`ExitPolicy.step` and :meth:`ExitPolicy.output_logits` traced to ONNX at that layer
(:func:`policy_step_graph`), so no policy is written twice. Policies that read more than the
logits (``lte``) are not traced: :func:`row_graph_support` says why.

Exits and logits equal the compaction loop's on the same executor: tested per policy against
:func:`eeengine.policies.run_policy` on the executor's logits of every exit
(``tests/test_row_graph.py``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Collection, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor

from eeengine.executors.onnx_graphs import as_arrays, initializer
from eeengine.heads import ExitHead
from eeengine.policies import ExitPolicy
from eeengine.policies.base import State

_OPSET = 17
_IDS = ("input_ids", "token_type_ids")  # (1, seq_len) int64 inputs: one row, no padding


def row_graph_support(policy: ExitPolicy) -> str | None:
    """Why ``policy`` cannot run in a row graph, or None when it can."""
    if policy.needs:
        return f"policy {policy.name!r} reads {', '.join(policy.needs)} besides the logits"
    return None


class _Step(torch.nn.Module):
    """``policy.step`` at one layer as a module: (logits, *state) -> (exit, output_logits,
    *state), the state tensors in ``keys`` order."""

    def __init__(self, policy: ExitPolicy, layer: int, keys: Sequence[str]) -> None:
        super().__init__()
        self.policy, self.layer, self.keys = policy, layer, list(keys)

    def forward(self, logits: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        before = dict(zip(self.keys, state, strict=True))
        exit_mask, new_state = self.policy.step(logits, self.layer, before)
        output = self.policy.output_logits(logits, new_state).float()
        return (exit_mask, output, *(new_state[key] for key in self.keys))


def policy_step_graph(
    policy: ExitPolicy, layer: int, num_labels: int, state: State
) -> onnx.GraphProto:
    """``policy``'s step at 1-based ``layer`` for one row, traced to ONNX (torch's TorchScript
    exporter, opset 17).

    Args:
        num_labels: classes of the exit heads (1: regression).
        state: the policy's state before the step, for a batch of one (its keys and shapes).

    Returns:
        A graph with inputs ``logits`` (1, num_labels) float32 and ``state.{key}`` (sorted keys),
        outputs ``exit`` (1,) bool, ``output_logits`` (1, num_labels) float32 and
        ``state_out.{key}``.
    """
    keys = sorted(state)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Step(policy, layer, keys),
            (torch.zeros(1, num_labels), *(state[key] for key in keys)),
            buffer,
            input_names=["logits", *(f"state.{key}" for key in keys)],
            output_names=["exit", "output_logits", *(f"state_out.{key}" for key in keys)],
            opset_version=_OPSET,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue()).graph


def row_exit_model(
    embeddings: onnx.ModelProto,
    layers: Sequence[onnx.ModelProto],
    heads: Sequence[ExitHead],
    policy: ExitPolicy,
    num_labels: int,
) -> onnx.ModelProto:
    """The early-exit loop of one row as one model (see the module docstring).

    Args:
        embeddings: :func:`eeengine.executors.onnx_graphs.embeddings_graph`'s model (its
            weights stay inputs, bound by pointer).
        layers: each layer's model, as the executor runs it (inputs ``hidden_states`` (1, seq,
            hidden) float32 and ``attention_mask`` (1, seq) int32; output ``output``).
        heads: the exit head after each layer, in eval mode.
        policy: the exit policy (:func:`row_graph_support` must be None).
        num_labels: classes of the heads (1: regression).

    Returns:
        A model with inputs ``input_ids`` and ``token_type_ids`` (1, seq) int64, one row
        without padding (every token attended and pooled), the embeddings' weights and the
        policy's initial state ``state.{key}`` (:meth:`ExitPolicy.init_state` for one row);
        outputs ``logits`` (1, num_labels) float32 (:meth:`ExitPolicy.output_logits` at the
        exit) and ``exit_layer`` (1,) int64, 1-based.

    Raises:
        ValueError: a policy the graph cannot run (:func:`row_graph_support`).
    """
    reason = row_graph_support(policy)
    if reason is not None:
        raise ValueError(f"no row graph: {reason}")
    builder = _Builder()
    # The loop's int64 ids, cast here for ONNX Runtime's ops (int32): no conversion per call.
    nodes = [helper.make_node("Cast", [n], [f"{n}.int32"], to=TensorProto.INT32) for n in _IDS]
    # No padding: the layers' mask is all ones, and the heads' mean pooling a plain mean.
    ones = helper.make_tensor("one_int32", TensorProto.INT32, [1], [1])
    nodes += [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("ConstantOfShape", ["ids_shape"], ["attention_mask.int32"], value=ones),
    ]
    weights = [i.name for i in embeddings.graph.input if i.name not in _IDS]
    names = {"output": "hidden_0", **{n: f"{n}.int32" for n in _IDS}}
    nodes += builder.inline(embeddings.graph, "embeddings/", names, keep=weights)
    state = policy.init_state(1, torch.device("cpu"), num_labels)
    state_names = {key: f"state.{key}" for key in sorted(state)}
    nodes += builder.chain(1, layers, heads, policy, num_labels, state, state_names)
    inputs = [
        *(helper.make_tensor_value_info(n, TensorProto.INT64, [1, "seq"]) for n in _IDS),
        *(i for i in embeddings.graph.input if i.name in weights),
        *(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(state[key].numpy().dtype), state[key].shape
            )
            for key, name in state_names.items()
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_labels]),
        helper.make_tensor_value_info("exit_layer", TensorProto.INT64, [1]),
    ]
    nodes += [
        helper.make_node("Identity", ["result_logits_1"], ["logits"]),
        helper.make_node("Identity", ["result_layer_1"], ["exit_layer"]),
    ]
    graph = helper.make_graph(nodes, "row_exit", inputs, outputs, builder.initializers)
    _drop_dead_code(graph)
    return helper.make_model(graph, opset_imports=builder.opsets(layers))


def _drop_dead_code(graph: onnx.GraphProto) -> set[str]:
    """Remove the nodes and initializers of ``graph`` and its ``If`` branches whose values
    nothing reads (e.g. a traced step's exit mask at the last layer, where every row exits:
    ONNX Runtime warns about each unused constant); return the names read in ``graph``, its
    branches included."""
    while True:
        read = {output.name for output in graph.output}
        for node in graph.node:
            read.update(node.input)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    read |= _drop_dead_code(attribute.g)
        live = [node for node in graph.node if any(name in read for name in node.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    kept = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return read


class _Builder:
    """Collects the initializers of the inlined graphs and makes the nodes of
    :func:`row_exit_model`."""

    def __init__(self) -> None:
        self.initializers: list[onnx.TensorProto] = []

    def inline(
        self,
        graph: onnx.GraphProto,
        prefix: str,
        names: dict[str, str],
        keep: Collection[str] = (),
    ) -> list[onnx.NodeProto]:
        """``graph``'s nodes, every value renamed ``prefix + name`` except those in ``names``
        (renamed to their value there) and those in ``keep`` (kept as they are); its
        initializers are renamed alike and collected."""
        kept = set(keep)

        def rename(name: str) -> str:
            if not name or name in kept:
                return name
            return names.get(name, prefix + name)

        for tensor in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = rename(tensor.name)
            self.initializers.append(copy)
        nodes = []
        for index, node in enumerate(graph.node):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            copy.name = f"{prefix}{index}:{node.name or node.op_type}"
            nodes.append(copy)
        return nodes

    def add(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(initializer(name, value))
        return name

    def head_nodes(self, head: ExitHead, layer: int) -> list[onnx.NodeProto]:
        """``hidden_{layer}`` -> ``logits_{layer}`` (1, num_labels): the head in eval mode."""
        p, hidden = f"head{layer}/", f"hidden_{layer}"
        if head.pooling == "mean":  # every token real (one row, no padding)
            nodes = [helper.make_node("ReduceMean", [hidden], [p + "pooled"], axes=[1], keepdims=0)]
        else:  # the [CLS] pooler: tanh(dense(hidden[:, 0]))
            pooler = head.pooler if head.pooler is not None else head._shared_pooler[0]
            self.add(p + "index_0", np.array(0, np.int64))
            weights = {"pooler_weight": pooler.dense.weight, "pooler_bias": pooler.dense.bias}
            for key, value in as_arrays(weights).items():
                self.add(p + key, value)
            nodes = [
                helper.make_node("Gather", [hidden, p + "index_0"], [p + "cls"], axis=1),
                helper.make_node(
                    "Gemm",
                    [p + "cls", p + "pooler_weight", p + "pooler_bias"],
                    [p + "dense"],
                    transB=1,
                ),  # fmt: skip
                helper.make_node("Tanh", [p + "dense"], [p + "pooled"]),
            ]
        weights = {"weight": head.classifier.weight, "bias": head.classifier.bias}
        for key, value in as_arrays(weights).items():
            self.add(p + key, value)
        return nodes + [
            helper.make_node(
                "Gemm", [p + "pooled", p + "weight", p + "bias"], [f"logits_{layer}"], transB=1
            )
        ]

    def chain(
        self,
        first: int,
        layers: Sequence[onnx.ModelProto],
        heads: Sequence[ExitHead],
        policy: ExitPolicy,
        num_labels: int,
        state: State,
        state_names: dict[str, str],
    ) -> list[onnx.NodeProto]:
        """Nodes running layers ``first`` .. L to the row's exit; they output
        ``result_logits_{first}`` and ``result_layer_{first}``. ``state`` and ``state_names``:
        the policy's state before layer ``first`` (values, and their names in the graph)."""
        num_layers = len(layers)
        nodes: list[onnx.NodeProto] = []
        for layer in range(first, num_layers + 1):
            names = {
                "hidden_states": f"hidden_{layer - 1}",
                "attention_mask": "attention_mask.int32",
                "output": f"hidden_{layer}",
            }
            nodes += self.inline(layers[layer - 1].graph, f"layer{layer}/", names)
            if not policy.decides_at(layer, num_layers) and layer < num_layers:
                continue  # no row exits here and the state does not change
            nodes += self.head_nodes(heads[layer - 1], layer)
            p = f"step{layer}/"
            step = policy_step_graph(policy, layer, num_labels, state)
            names = {f"state.{key}": value for key, value in state_names.items()}
            nodes += self.inline(step, p, {"logits": f"logits_{layer}", **names})
            # The state after this layer, for the next step's shapes.
            state = policy.step(torch.zeros(1, num_labels), layer, dict(state))[1]
            state_names = {key: f"{p}state_out.{key}" for key in state_names}
            result = [f"result_logits_{first}", f"result_layer_{first}"]
            layer_value = self.add(f"layer_{layer}", np.array([layer], np.int64))
            if layer == num_layers:  # every row exits at the last layer
                return nodes + [
                    helper.make_node("Identity", [p + "output_logits"], [result[0]]),
                    helper.make_node("Identity", [layer_value], [result[1]]),
                ]
            # The rest's weights are its branch's own initializers: as outer-scope values, every
            # If would pass all of them to its branch as implicit inputs at each run.
            outer, self.initializers = self.initializers, []
            rest = self.chain(layer + 1, layers, heads, policy, num_labels, state, state_names)
            rest_initializers, self.initializers = self.initializers, outer
            nodes.append(
                helper.make_node(
                    "If",
                    [p + "exit"],
                    result,
                    then_branch=_branch(
                        f"exit_{layer}",
                        [
                            helper.make_node("Identity", [p + "output_logits"], [p + "r_logits"]),
                            helper.make_node("Identity", [layer_value], [p + "r_layer"]),
                        ],
                        [p + "r_logits", p + "r_layer"],
                    ),
                    else_branch=_branch(
                        f"after_{layer}",
                        rest,
                        [f"result_logits_{layer + 1}", f"result_layer_{layer + 1}"],
                        rest_initializers,
                    ),
                )
            )
            return nodes
        raise AssertionError("unreachable: the last layer returns")

    @staticmethod
    def opsets(layers: Sequence[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
        """The layer models' opsets (the standard one at least :data:`_OPSET`)."""
        versions = {"": _OPSET}
        for model in layers:
            for opset in model.opset_import:
                versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
        return [helper.make_opsetid(domain, version) for domain, version in versions.items()]


def _branch(
    name: str,
    nodes: list[onnx.NodeProto],
    outputs: list[str],
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.GraphProto:
    """An ``If`` branch: ``nodes``, no inputs (it reads the outer graph's values), and
    ``outputs`` (logits float32, exit layer int64)."""
    values = [
        helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, None),
        helper.make_tensor_value_info(outputs[1], TensorProto.INT64, None),
    ]
    return helper.make_graph(nodes, name, [], values, initializers)
