"""ONNX Runtime executor: the embeddings and each encoder layer are ONNX Runtime sessions.

The sessions run the graphs of :mod:`eeengine.executors.onnx_graphs`, built from the torch
weights at load time with ONNX Runtime's fused transformer ops, and loaded from a temporary
directory deleted once the sessions exist. Precision ``"int8"`` quantizes each layer graph
(:func:`eeengine.executors.onnx_graphs.quantize_int8`); ``"int8_static"`` builds each layer
with fixed activation scales from the checkpoint's statistics
(:func:`eeengine.executors.int8_static.int8_static_layer_graph`).

Memory: one copy of the weights. The embedding tables (half of MiniLM's weights) are not
copied: they are inputs of the embeddings session, bound once to the torch tensors. The
layer weights are ONNX Runtime's own (it repacks them for its GEMMs at session creation, a
layout torch cannot share); :meth:`OnnxRuntimeExecutor.release_torch_layers` then drops the
torch copy of the layers, and their pages of the checkpoint's memory map, for an owner that
runs nothing else on them (:class:`eeengine.Engine`). The process-wide settings the sessions
share (thread pool, scratch arena) are in :mod:`eeengine.executors.ort_environment`.

MPEE token pruning (``pruning_layers``): a pruning layer is two sessions, its attention
sublayer (:func:`attention_graph`, which also returns the [CLS] query and the keys the pruning
rule reads) and its feed-forward sublayer (:func:`feed_forward_graph`; at "int8_static"
:func:`eeengine.executors.int8_static.int8_static_attention_graph` and
:func:`~eeengine.executors.int8_static.int8_static_feed_forward_graph`); the fused
``token_prune`` runs between them, so pruning layers run at the executor's precision too.

A batch of one row can run the whole early-exit loop as one more session, the row graph
(:meth:`OnnxRuntimeExecutor.row_loop`, :mod:`eeengine.executors.row_graph`, run by
:class:`eeengine.executors.row_loop.RowLoop`), built from the layer graphs the executor keeps:
on POSIX as open files whose names are removed once the sessions load (nothing is left in
``$TMPDIR`` even by a killed process), elsewhere in a temporary directory deleted with it.

Several threads may use one executor: its session runs take turns (the bindings and the row
graph's buffers are the executor's own), each run on all the pool's threads.

Threads: every session runs on ONNX Runtime's process-wide intra-op thread pool (made by the
first executor; :func:`.ort_environment.global_thread_pool_size`), whose workers spin between
the sessions of a forward pass as a single session's would. ONNX Runtime then refuses new
sessions of the process with their own pools: other code making sessions sets
``use_per_session_threads = False``, or the process sets
``EEENGINE_ORT_GLOBAL_THREAD_POOL=0`` first (per-session pools, slower).

Hidden states stay torch tensors: each session reads and writes them in place through
IOBinding (pointers, no copies), and the exit head, the policy step and the batch compaction
between layers run in eeengine exactly as with the torch executor. Running the embeddings in
ONNX Runtime too means no multi-threaded torch op runs between two sessions (waking torch's
thread pool costs more than a small op at batch 1 on a busy CPU). The torch ops that remain
run on one thread (:meth:`OnnxRuntimeExecutor.host_ops`, :func:`.single_threaded_torch`): with
torch's own pool, each multi-threaded one waited for cores that ONNX Runtime's workers were
spinning on, a softmax of 32 x 2 logits took 1.6-3.9 ms instead of 5 us, and early exit at
batch 32 ran 1.48x (fp32) / 1.62x (int8) slower under OpenMP's default waiting
(``benchmarks/torch_threads.py``).
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

import onnx
import onnxruntime
import torch
from torch import Tensor

from eeengine.executors.base import LayerExecutor
from eeengine.executors.host_memory import drop_file_pages, release_freed_heap
from eeengine.executors.int8_static import (
    int8_static_attention_graph,
    int8_static_feed_forward_graph,
    int8_static_layer_graph,
)
from eeengine.executors.io_binding import bind_pointer
from eeengine.executors.onnx_graphs import (
    attention_graph,
    cpu_session,
    embeddings_graph,
    feed_forward_graph,
    layer_graph,
    quantize_int8,
)
from eeengine.executors.ort_environment import session_options, single_threaded_torch
from eeengine.executors.row_graph import row_exit_model, row_graph_support
from eeengine.executors.row_loop import RowLoop
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.token_pruning import TokenPruneOutput

PRECISIONS = ("fp32", "int8", "int8_static")
# Batches up to this many tokens (batch_size x seq_len) leave their scratch memory in the shared
# arena for the next call (MiniLM: about 25 MB at 4,096 tokens); larger ones give it back at
# the end of the call (OnnxRuntimeExecutor.release_scratch).
KEEP_SCRATCH_TOKENS = 4096


class OnnxRuntimeExecutor(LayerExecutor):
    """Runs the embeddings and each encoder layer of a CPU, float32 :class:`MultiExitBert` with
    a BERT backbone and exact GELU as ONNX Runtime sessions (see the module docstring).

    Args:
        model: the multi-exit model, on CPU, in eval mode.
        precision: "fp32", "int8" (the layers' linear weights quantized, see the module
            docstring) or "int8_static" (:mod:`eeengine.executors.int8_static`).
        num_threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
            The sessions run on ONNX Runtime's process-wide thread pool, which the first
            executor of the process makes with its count (see
            :func:`.ort_environment.global_thread_pool_size`).
        pruning_layers: 0-based layers the loop runs with MPEE token pruning
            (:meth:`pruned_layer`): each is built as two sessions, its attention sublayer
            (:func:`attention_graph`) and its feed-forward sublayer
            (:func:`feed_forward_graph`), so the tokens can be pruned between them at the
            executor's precision; :meth:`layer` runs the two back to back.

        activations: "int8_static" only: the activation statistics of
            :func:`eeengine.executors.int8_static.activation_absmax`.

    Raises:
        ValueError: an unknown precision; "int8_static" without ``activations``.
    """

    name = "onnxruntime"
    # LayerExecutor.split_cost. SST-2 dev in calls of 32 sentences (benchmarks/padding_split.py):
    # full depth 1.58x faster at 64 (fp32 and int8), 1.46x / 1.49x at 128; int8 early exit
    # 1.42x at 64 (1.36-1.41x at 32-256).
    split_cost = 64.0

    def __init__(
        self,
        model: MultiExitBert,
        precision: str = "fp32",
        num_threads: int | None = None,
        pruning_layers: frozenset[int] = frozenset(),
        activations: dict[str, Tensor] | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"the onnxruntime executor runs {' or '.join(PRECISIONS)}, not {precision!r}"
            )
        if precision == "int8_static" and activations is None:
            raise ValueError("precision 'int8_static' needs the checkpoint's activation statistics")
        self.precision = precision
        self.model = model
        config = model.config
        threads = num_threads or torch.get_num_threads()
        options = session_options(threads)
        embeddings, self._embedding_weights = embeddings_graph(model.backbone.embeddings)
        sessions = [cpu_session(embeddings.SerializeToString(), options)]
        heads, eps = config.num_attention_heads, config.layer_norm_eps
        # Session of layer i: i + 1; of a pruning layer's feed-forward sublayer:
        # self._feed_forward[i], after the layers.
        self._feed_forward: dict[int, int] = {}
        # Layer sessions load from files: one from bytes keeps the bytes (a second copy of
        # the weights) referenced for its lifetime. Without pruning layers the layer graphs
        # are kept for the row graph (row_loop): on POSIX as open files whose names are
        # removed once loaded, so nothing is left on disk even after kill -9; elsewhere in
        # the directory, deleted with the executor.
        self._graph_dir = tempfile.TemporaryDirectory(prefix="eeengine-onnx-")
        self._layer_files: list[BinaryIO] = []
        weakref.finalize(self, _close_all, self._layer_files)  # closed with the executor
        self._threads, self._embeddings_model = threads, embeddings
        self._row: tuple[tuple, RowLoop] | None = None  # the row graph of the last policy
        # One session run at a time: the bindings (and what _bound remembers of them) are the
        # executor's, so two threads' runs would overwrite each other's pointers.
        self._lock = threading.Lock()
        tmp = self._graph_dir.name
        keep_open = not pruning_layers and os.name == "posix"

        def load(graph: onnx.ModelProto, name: str) -> onnxruntime.InferenceSession:
            path = Path(tmp) / f"{name}.onnx"
            if precision == "int8":
                quantize_int8(graph, path)
            else:
                onnx.save(graph, path)
            session = cpu_session(str(path), options)
            if keep_open:
                self._layer_files.append(path.open("rb"))
            return session

        layers = model.backbone.layers
        static = precision == "int8_static"
        for index, layer in enumerate(layers):
            if index in pruning_layers:
                graph = (
                    int8_static_attention_graph(layer, heads, eps, activations, index)
                    if static
                    else attention_graph(layer, heads, eps)
                )
            elif static:
                graph = int8_static_layer_graph(layer, heads, eps, activations, index)
            else:
                graph = layer_graph(layer, heads, eps)
            sessions.append(load(graph, f"layer{index}"))
            del graph  # one layer's transient copies at a time
        for index in sorted(pruning_layers):
            self._feed_forward[index] = len(sessions)
            layer = layers[index]
            graph = (
                int8_static_feed_forward_graph(layer, eps, activations, index)
                if static
                else feed_forward_graph(layer, eps)
            )
            sessions.append(load(graph, f"feed_forward{index}"))
        if pruning_layers or keep_open:
            self._graph_dir.cleanup()
        release_freed_heap()
        self._sessions = sessions
        self._bindings = [session.io_binding() for session in self._sessions]
        self._bound: list[dict[str, tuple]] = [{} for _ in self._sessions]
        # Bound once: IOBinding keeps them for every run (the torch tensors outlive it).
        for key, value in self._embedding_weights.items():
            bind_pointer(self._bindings[0].bind_input, key, value)
        self._hidden_size = config.hidden_size
        self._largest_batch_tokens = 0  # batch_size x seq_len, since release_scratch

    def row_loop(self, policy: ExitPolicy) -> RowLoop | None:
        """The early-exit loop of one row as one session (:mod:`eeengine.executors.row_graph`),
        built at the first call with ``policy`` (about 0.5 s for MiniLM) and kept until
        another policy asks; None where there is none: pruning layers, or a policy the graph
        cannot run (:func:`~eeengine.executors.row_graph.row_graph_support`).

        The session holds its own copy of the layer weights (MiniLM: +23 MiB resident at int8,
        +54 MiB at fp32, BENCHMARKS.md), built only for a process that predicts one row at a
        time.
        """
        if self.row_loop_unavailable(policy) is not None:
            return None
        key = policy.key()
        with self._lock:  # one build, and no thread runs a session being replaced
            if self._row is None or self._row[0] != key:
                self._row = None  # free the old session first
                self._row = (key, self._build_row_loop(policy))
            return self._row[1]

    def row_loop_unavailable(self, policy: ExitPolicy) -> str | None:
        """Why :meth:`row_loop` gives no row graph for ``policy``, or None where it gives one."""
        if self._feed_forward:
            return "token-pruning layers run as two sessions each"
        return row_graph_support(policy)

    def _layer_model(self, index: int) -> onnx.ModelProto:
        """Layer ``index``'s graph, as its session was built from it."""
        if self._layer_files:
            file = self._layer_files[index]
            file.seek(0)
            return onnx.load(file)
        return onnx.load(Path(self._graph_dir.name) / f"layer{index}.onnx")

    def _build_row_loop(self, policy: ExitPolicy) -> RowLoop:
        model = self.model
        layers = [self._layer_model(i) for i in range(model.num_layers)]
        heads = [model.exit_head(i) for i in range(model.num_layers)]
        graph = row_exit_model(self._embeddings_model, layers, heads, policy, model.num_labels)
        del layers
        options = session_options(self._threads)
        # Errors only: ORT's graph optimizer warns where it cannot rename a value an If branch
        # reads (an Identity it would remove), an optimization missed, not a problem.
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="eeengine-onnx-") as directory:
            path = Path(directory) / "row.onnx"
            onnx.save(graph, path)
            del graph
            session = cpu_session(str(path), options)
        release_freed_heap()  # the transient graphs: 40 MiB of RSS at int8 without the trim
        state = policy.init_state(1, torch.device("cpu"), model.num_labels)
        return RowLoop(session, self._embedding_weights, state, model.num_labels)

    def host_ops(self) -> AbstractContextManager[None]:
        """torch on one thread (:func:`.single_threaded_torch`): the cores belong to ONNX
        Runtime's pool, whose workers spin between sessions."""
        return single_threaded_torch()

    def release_torch_layers(self) -> None:
        """Drop the torch weights of the encoder layers, so that their only copy is ONNX
        Runtime's. The torch layers cannot run afterwards (their parameters are on the
        ``meta`` device: any use raises).

        A checkpoint's weights are views of one memory map of its file, which the embeddings
        keep open: the layers' pages, read once to build the graphs, are dropped from resident
        memory too (:func:`~eeengine.executors.host_memory.drop_file_pages`; MiniLM at fp32:
        -40 MiB, BENCHMARKS.md).

        For an owner that runs the layers only through this executor; the model given to the
        constructor is changed in place.
        """
        layers = self.model.backbone.layers
        released = {id(t): t for t in (*layers.parameters(), *layers.buffers())}
        model = (*self.model.parameters(), *self.model.buffers())
        kept = [t for t in model if id(t) not in released]
        drop_file_pages(released.values(), keep=kept)
        for layer in layers:
            layer.to_empty(device="meta")
        release_freed_heap()

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch_size, seq_len) int64 ids -> (batch_size, seq_len, hidden_size) float32."""
        output = torch.empty((*input_ids.shape, self._hidden_size), dtype=torch.float32)
        inputs = {"input_ids": _int32(input_ids), "token_type_ids": _int32(token_type_ids)}
        return self._run(0, inputs, {"output": output})[0]

    def mask(self, attention_mask: Tensor) -> Tensor:
        """The (batch_size, seq_len) 1/0 mask as contiguous int32, what ``Attention`` takes."""
        return _int32(attention_mask)

    def layer(self, index: int, hidden_states: Tensor, mask: Tensor) -> Tensor:
        """Layer ``index`` (0-based) on (batch_size, seq_len, hidden_size) float32 CPU hidden
        states; returns a new tensor of the same shape, written by ONNX Runtime in place."""
        if index in self._feed_forward:
            return self._run_feed_forward(index, self._run_attention(index, hidden_states, mask)[0])
        hidden_states = self._track(hidden_states)
        inputs = {"hidden_states": hidden_states, "attention_mask": mask}
        return self._run(index + 1, inputs, {"output": torch.empty_like(hidden_states)})[0]

    def pruned_layer(
        self,
        index: int,
        hidden_states: Tensor,
        mask: Tensor,
        attention_mask: Tensor,
        memory: Tensor,
        keep_ratio: float,
        beta: float,
        prune: Callable[..., TokenPruneOutput],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``index`` with MPEE token pruning between its two sublayers, as
        :meth:`eeengine.modeling_bert.PrunableLayer.pruned_forward` (arguments and returns
        there; ``mask`` is :meth:`mask` of ``attention_mask``): the attention session, then
        ``prune`` on its outputs, then the feed-forward session on the kept tokens.

        Raises:
            ValueError: the layer was not built for pruning (``pruning_layers``).
        """
        if index not in self._feed_forward:
            raise ValueError(
                f"layer {index + 1} was built without token pruning; build the executor with "
                f"a token-pruning schedule that prunes at layer {index + 1}"
            )
        attention_output, cls_query, key = self._run_attention(index, hidden_states, mask)
        pruned = prune(attention_output, attention_mask, cls_query, key, memory, keep_ratio, beta)
        output = self._run_feed_forward(index, pruned.hidden_states)
        return output, pruned.attention_mask, pruned.memory

    def _run_attention(
        self, index: int, hidden_states: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The attention session of pruning layer ``index``: attention_output, cls_query, key
        (see :func:`attention_graph`)."""
        hidden_states = self._track(hidden_states)
        batch_size, seq_len, hidden_size = hidden_states.shape
        heads = self.model.config.num_attention_heads
        head_size = hidden_size // heads
        keys_shape = (batch_size, heads, seq_len, head_size)
        # int8_static's MultiHeadAttention outputs the keys alone; Attention keys and values.
        keys_only = self.precision == "int8_static"
        outputs = {
            "attention_output": torch.empty_like(hidden_states),
            "cls_query": torch.empty(batch_size, heads, head_size),
            "present_key" if keys_only else "present": torch.empty(
                keys_shape if keys_only else (2, *keys_shape)
            ),
        }
        inputs = {"hidden_states": hidden_states, "attention_mask": mask}
        attention_output, cls_query, present = self._run(index + 1, inputs, outputs)
        return attention_output, cls_query, present if keys_only else present[0]

    def _run_feed_forward(self, index: int, attention_output: Tensor) -> Tensor:
        attention_output = self._track(attention_output)
        inputs = {"attention_output": attention_output}
        output = {"output": torch.empty_like(attention_output)}
        return self._run(self._feed_forward[index], inputs, output)[0]

    def _track(self, hidden_states: Tensor) -> Tensor:
        """``hidden_states`` contiguous, its batch_size x seq_len counted for
        :meth:`release_scratch`."""
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        self._largest_batch_tokens = max(self._largest_batch_tokens, tokens)
        return hidden_states.contiguous()

    def release_scratch(self) -> None:
        """Return the shared arena's free chunks to the system (ONNX Runtime's arena shrinkage,
        applied on a one-token run of the embeddings session) if a batch since the last call
        had more than :data:`KEEP_SCRATCH_TOKENS` tokens; else keep them for the next call.

        So scratch memory is reused across the layers of a forward pass and across the batches
        of one :meth:`eeengine.Engine.predict` chunk (64 batches), and a large call does not
        leave its working set resident (measured: 1410 -> 573 MiB after a batch of 256 x 128
        tokens, in 32 ms).
        """
        if self._largest_batch_tokens <= KEEP_SCRATCH_TOKENS:
            return
        self._largest_batch_tokens = 0
        one = torch.zeros((1, 1), dtype=torch.int64)
        options = onnxruntime.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._run(0, {"input_ids": _int32(one), "token_type_ids": _int32(one)},
                  {"output": torch.empty((1, 1, self._hidden_size))}, options)  # fmt: skip

    def _run(
        self,
        session: int,
        inputs: dict[str, Tensor],
        outputs: dict[str, Tensor],
        options: onnxruntime.RunOptions | None = None,
    ) -> list[Tensor]:
        """Run session ``session`` (0: embeddings, l: layer l, then the feed-forward sublayers
        of pruning layers) on contiguous CPU tensors bound by pointer (no copies); ``outputs``
        are written in place and returned in order."""
        binding, bound = self._bindings[session], self._bound[session]
        with self._lock:
            for name, tensor in inputs.items():
                # A binding is a pointer, a shape and a type: the same three again need no call
                # (the attention mask, bound once for the layers between two compactions).
                key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
                if bound.get(name) != key:
                    bind_pointer(binding.bind_input, name, tensor)
                    bound[name] = key
            for name, tensor in outputs.items():
                bind_pointer(binding.bind_output, name, tensor)
            self._sessions[session].run_with_iobinding(binding, options)
        return list(outputs.values())


def _close_all(files: list[BinaryIO]) -> None:
    for file in files:
        file.close()


def _int32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.int32).contiguous()
