"""Layer executors against an independent reference, Hugging Face transformers' BertModel on
the same weights (its hidden states, and :func:`run_policy` on the exit heads' logits of them),
and the Engine with each executor. Every test gets its own model (the torch executor fuses the
query/key/value projections in place), so the module passes in any order.

Tolerance: eeengine's torch layers and transformers' differ in the order of fp32 sums only
(<= 1e-5, as :func:`tests.conftest.assert_matches_transformers`). ONNX Runtime computes the
same fp32 math with other kernels (GEMM blocking, fused softmax and LayerNorm), so only the
order of fp32 sums differs. That moves each layer's output by a few ulps of the largest
activation; ATOL = 1e-5 covers it with margin (measured: <= 6e-6 on all-MiniLM-L6-v2, whose
activations reach ~10). Exit decisions must be equal.
"""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from transformers import BertModel as HFBertModel

from eeengine import Engine
from eeengine.batching import collate, encode
from eeengine.executors import EXECUTORS, TorchExecutor, make_executor
from eeengine.policies import make_policy, run_policy
from eeengine.runtime import early_exit_forward
from eeengine.token_pruning import TokenPruning
from tests.conftest import SENTENCES, make_tiny_model

ATOL = RTOL = 1e-5


def _available(name: str) -> str:
    if name == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    return name


@pytest.fixture
def model(tiny_bert_dir):
    """A fresh model per test: the torch executor fuses its query/key/value projections in
    place, which must not leak into another test."""
    return make_tiny_model(tiny_bert_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Right-padded rows of different lengths, with a second segment in the last row."""
    input_ids, attention_mask, token_type_ids = collate(
        encode(tokenizer, SENTENCES, None, 64), range(len(SENTENCES)), 0
    )
    token_type_ids[-1, 3:] = 1
    return input_ids, attention_mask, token_type_ids


@pytest.fixture(scope="module")
def expected_hidden_states(tiny_bert_dir, batch) -> tuple:
    """The independent reference: Hugging Face transformers' BertModel on the same weights
    (:func:`make_tiny_model` loads the backbone from ``tiny_bert_dir``); the embeddings, then
    the output of every layer, each (batch_size, seq_len, hidden_size) float32."""
    input_ids, attention_mask, token_type_ids = batch
    hf = HFBertModel.from_pretrained(tiny_bert_dir).eval()
    with torch.no_grad():
        return hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        ).hidden_states


@pytest.mark.parametrize("pruning_layers", [(), (2, 3)])
@pytest.mark.parametrize("name", EXECUTORS)
def test_every_layer_matches_transformers(
    model, batch, expected_hidden_states, name, pruning_layers
):
    """Every layer alone; ``pruning_layers`` (1-based): layers 2 and 3 built for token pruning
    (ONNX Runtime: two sessions each, attention then feed-forward, run back to back here)."""
    input_ids, attention_mask, token_type_ids = batch
    expected = expected_hidden_states
    with torch.inference_mode():
        schedule = TokenPruning(pruning_layers, 0.7, (1.0,) * len(pruning_layers))
        executor = make_executor(_available(name), model, "fp32", schedule)
        assert executor.name == name
        actual = [executor.embed(input_ids, token_type_ids)]
        mask = executor.mask(attention_mask)
        for index in range(model.num_layers):
            actual.append(executor.layer(index, expected[index], mask))  # same input per layer
    real = attention_mask.bool()
    for layer, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a[real], e[real], atol=ATOL, rtol=RTOL, msg=f"layer {layer}")


@pytest.mark.parametrize("name", EXECUTORS)
@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("entropy", {"threshold": [0.45, 0.15, 0.6, 0.6]}),
        ("pcee", {"threshold": 0.75, "patience": 2}),
    ],
)
def test_loop_exits_as_the_policy_on_transformers_states(
    model, batch, expected_hidden_states, name, policy, params
):
    """The loop (compaction, executor) against :func:`run_policy` on the exit heads' logits
    of the transformers hidden states: no compaction, no executor, no eeengine encoder."""
    policy = make_policy(policy, **params)
    attention_mask = batch[1]
    with torch.no_grad():
        all_logits = torch.stack(
            [
                model.exit_head(index).classify(model.exit_head(index).pool(hidden, attention_mask))
                for index, hidden in enumerate(expected_hidden_states[1:])
            ]
        )
    expected_layer, expected_logits = run_policy(policy, all_logits)
    executor = make_executor(_available(name), model)
    actual = early_exit_forward(model, policy, *batch, executor=executor)
    assert len(set(expected_layer.tolist())) >= 2  # rows leave the batch early
    assert actual.exit_layer.tolist() == expected_layer.tolist()
    torch.testing.assert_close(actual.logits, expected_logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", EXECUTORS)
def test_engine_batched_equals_one_by_one(tiny_ckpt, name):
    engine = Engine(tiny_ckpt, executor=_available(name))
    assert engine.executor == name
    together = engine.predict(SENTENCES, batch_size=5)
    for sentence, batched in zip(SENTENCES, together, strict=True):
        alone = engine.predict(sentence)
        assert (alone.label, alone.exit_layer) == (batched.label, batched.exit_layer)
        assert alone.logits == pytest.approx(batched.logits, abs=ATOL)


def test_engine_executors_agree(tiny_ckpt):
    _available("onnxruntime")
    reference = Engine(tiny_ckpt, executor="torch").predict(SENTENCES, batch_size=3)
    default = Engine(tiny_ckpt)  # None: onnxruntime where it can run
    assert default.executor == "onnxruntime"
    actual = default.predict(SENTENCES, batch_size=3)
    assert [p.exit_layer for p in actual] == [p.exit_layer for p in reference]
    torch.testing.assert_close(
        torch.tensor([p.logits for p in actual]),
        torch.tensor([p.logits for p in reference]),
        atol=ATOL,
        rtol=RTOL,
    )


def test_fused_qkv_is_used_in_eval_only(model, batch, expected_hidden_states):
    input_ids, attention_mask, token_type_ids = batch
    TorchExecutor(model)  # fuses
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.qkv_weight.shape == (
        3 * attention.query.out_features,
        attention.query.in_features,
    )
    with torch.no_grad():  # the fused copy is what runs in eval: the originals no longer matter
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.zero_()
    with torch.inference_mode():
        fused = model.backbone(input_ids, attention_mask, token_type_ids)
    real = attention_mask.bool()
    for layer, (a, e) in enumerate(zip(fused, expected_hidden_states[1:], strict=True), start=1):
        torch.testing.assert_close(a[real], e[real], atol=ATOL, rtol=RTOL, msg=f"layer {layer}")
    assert "qkv_weight" not in "".join(model.state_dict())  # Hugging Face keys only
    model.train()
    assert attention.qkv_weight is None  # training never reads a stale copy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"executor": "tensorrt"}, "unknown executor 'tensorrt'")],
)
def test_bad_executor(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_ckpt, **kwargs)


def test_onnxruntime_refuses_training_mode(tiny_bert_dir):
    _available("onnxruntime")
    with pytest.raises(ValueError, match="model.eval"):
        make_executor("onnxruntime", make_tiny_model(tiny_bert_dir).train())


@pytest.mark.parametrize("name", EXECUTORS)
def test_release_scratch_keeps_results(model, batch, expected_hidden_states, name, monkeypatch):
    """Giving the scratch memory back between calls (every call here: the threshold is 0
    tokens) changes no result: each layer still matches transformers after a release."""
    if name == "onnxruntime":
        _available(name)
        import eeengine.executors.onnxruntime as ort_executor

        monkeypatch.setattr(ort_executor, "KEEP_SCRATCH_TOKENS", 0)
    input_ids, attention_mask, token_type_ids = batch
    with torch.inference_mode():
        executor = make_executor(name, model)
        for _ in range(2):
            hidden_states = executor.embed(input_ids, token_type_ids)
            mask = executor.mask(attention_mask)
            for index in range(model.num_layers):
                hidden_states = executor.layer(index, hidden_states, mask)
                real = attention_mask.bool()
                torch.testing.assert_close(
                    hidden_states[real], expected_hidden_states[index + 1][real],
                    atol=ATOL, rtol=RTOL,
                )  # fmt: skip
            executor.release_scratch()


_THREAD_POOL_SCRIPT = """
import warnings
import onnxruntime, torch
from onnx import TensorProto, helper
from eeengine.executors.onnxruntime import OnnxRuntimeExecutor
from eeengine.executors.ort_environment import (
    global_thread_pool_size, neighbour_session_options,
)
from eeengine.modeling_multiexit import MultiExitBert
from tests.conftest import tiny_config

torch.manual_seed(0)
model = MultiExitBert(tiny_config(), 2).eval()
hidden = torch.randn(2, 5, model.config.hidden_size)
mask = torch.ones(2, 5, dtype=torch.long)
first = OnnxRuntimeExecutor(model, "fp32", num_threads=1)
expected = first.layer(0, hidden, first.mask(mask))
print("pool", global_thread_pool_size())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    second = OnnxRuntimeExecutor(model, "fp32", num_threads=2)
print("warned", any("global thread pool has 1 threads" in str(w.message) for w in caught))
print("same", torch.equal(second.layer(0, hidden, second.mask(mask)), expected))
graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
)
onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
serialized = onnx_model.SerializeToString()
options = neighbour_session_options(2)
onnxruntime.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
print("other session ok")
"""


@pytest.mark.parametrize("global_pool", [True, False])
def test_onnxruntime_sessions_share_the_global_thread_pool_unless_told_not_to(global_pool):
    """The first executor of a process makes ONNX Runtime's global pool with its thread count;
    a second executor asking for another count shares it (with a warning) and computes the
    same; another session of the process can still be made (neighbour_session_options).
    EEENGINE_ORT_GLOBAL_THREAD_POOL=0 keeps per-session pools (a fresh process each: the pool
    is process-wide)."""
    _available("onnxruntime")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "EEENGINE_ORT_GLOBAL_THREAD_POOL": "1" if global_pool else "0"}
    result = subprocess.run(
        [sys.executable, "-c", _THREAD_POOL_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines == [
        f"pool {1 if global_pool else None}",
        f"warned {global_pool}",
        "same True",
        "other session ok",
    ]


def test_onnxruntime_engine_answers_threads_as_one_caller(tiny_ckpt):
    """Several threads predicting at once get what one caller gets: the executor's session
    bindings are shared, so its runs take turns (they overwrote each other's pointers)."""
    engine = Engine(tiny_ckpt, executor="onnxruntime")
    inputs = SENTENCES * 3
    expected = [(p.exit_layer, p.logits) for p in engine.predict(inputs, batch_size=1)]
    wrong: list[int] = []

    def caller(offset: int) -> None:
        for _ in range(4):
            for i in range(offset % 2, len(inputs), 2):
                batch = [inputs[i]] if offset < 2 else [inputs[i], inputs[i - 1]]
                prediction = engine.predict(batch, batch_size=len(batch))[0]
                layer, logits = expected[i]
                if prediction.exit_layer != layer or not torch.allclose(
                    torch.tensor(prediction.logits), torch.tensor(logits), atol=1e-5
                ):
                    wrong.append(i)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_layer_sessions_keep_layer_norm_as_the_standard_op(model, tmp_path):
    """The layer graphs' ``Add`` + ``LayerNormalization`` stay apart in the executor's sessions:
    ONNX Runtime's own pass would make them its slower ``SkipLayerNormalization``
    (BENCHMARKS.md, "LayerNorm as standard ops")."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from eeengine.executors.onnx_graphs import cpu_session, layer_graph
    from eeengine.executors.ort_environment import neighbour_session_options

    config = model.config
    graph = layer_graph(
        model.bert.encoder.layer[0], config.num_attention_heads, config.layer_norm_eps
    ).SerializeToString()

    def optimized_ops(make_session) -> list[str]:
        options = neighbour_session_options(1)  # the process may hold the global pool
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        make_session(graph, options)
        return [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]

    ops = optimized_ops(cpu_session)
    assert ops.count("LayerNormalization") == 2 and "SkipLayerNormalization" not in ops
    default = optimized_ops(
        lambda graph, options: ort.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )
    )
    assert default.count("SkipLayerNormalization") == 2  # what the disabled pass does


@pytest.mark.skipif(os.name != "posix", reason="open files outlive their names on POSIX only")
def test_onnxruntime_executor_leaves_no_files_even_when_killed(tiny_ckpt, tmp_path):
    """The layer graphs the row graph is built from are kept as open files whose names are
    gone once loaded: a process killed with SIGKILL leaves none of eeengine's files in the
    temp directory."""
    pytest.importorskip("onnxruntime")
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = (
        "import sys\n"
        "from eeengine import Engine\n"
        f"engine = Engine({str(tiny_ckpt)!r}, executor='onnxruntime')\n"
        "first = engine.predict('a gorgeous, witty film')\n"
        "again = engine.predict('a gorgeous, witty film')  # builds the row graph\n"
        "assert engine._executor._row is not None and again.label == first.label\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "TMPDIR": str(temp)}

    def ours() -> list[str]:  # ONNX Runtime and torch keep files of their own there
        return [path.name for path in temp.iterdir() if path.name.startswith("eeengine-")]

    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as child:
        try:
            assert child.stdout.readline() == b"ready\n"
            assert ours() == []  # nothing named while it runs, either
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            child.kill()
    assert ours() == []
