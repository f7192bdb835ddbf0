"""Token pruning (MPEE token-wise exit) in the early-exit loop and in the Engine: keep ratio 1
is the unpruned model exactly, batched equals one by one, both backends agree, token counts
and FLOPs are as the schedule says."""

from __future__ import annotations

import json

import pytest
import torch

from eeengine import CheckpointError, Engine
from eeengine._custom_ops import HAS_C
from eeengine.batching import collate, encode
from eeengine.data import Split
from eeengine.evaluation import evaluate
from eeengine.executors import make_executor
from eeengine.flops import FlopCounter
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import make_policy, run_policy
from eeengine.report import sweep_report
from eeengine.runtime import early_exit_forward
from eeengine.token_pruning import DEFAULT_TOKEN_PRUNING, TokenPruning
from tests.conftest import BACKBONE_TYPES, HF_MODELS, SENTENCES, make_tiny_model

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_C, reason="no C"))]
POLICIES = [
    ("entropy", {"threshold": [0.45, 0.15, 0.6, 0.6]}),
    ("pcee", {"threshold": 0.75, "patience": 2}),
    ("patience", {"patience": 2}),
    ("mpee", {"threshold": 0.5}),
    ("none", {}),
]
SCHEDULE = TokenPruning(layers=(1, 3), keep_ratio=0.6, beta=(1.0, 0.5))


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    """The tiny model with sharper attention, so [CLS] attention ranks tokens clearly (a random
    model's attention is almost uniform: near-ties would make the test depend on rounding)."""
    model = make_tiny_model(tiny_bert_dir)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def encoded(tokenizer):
    return encode(tokenizer, SENTENCES, None, 64)


def run(model, encoded, rows, policy, backend, token_pruning):
    batch = collate(encoded, rows, 0)
    return early_exit_forward(model, policy, *batch, backend=backend, token_pruning=token_pruning)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_keep_ratio_one_is_the_unpruned_model(model, encoded, name, params, backend):
    policy = make_policy(name, **params)
    rows = range(len(SENTENCES))
    unpruned = run(model, encoded, rows, policy, backend, None)
    keep_all = TokenPruning(layers=(1, 2, 3), keep_ratio=1.0, beta=(1.0, 0.5, 0.5))
    pruned = run(model, encoded, rows, policy, backend, keep_all)
    assert torch.equal(pruned.exit_layer, unpruned.exit_layer)
    assert torch.equal(pruned.logits, unpruned.logits)
    assert torch.equal(pruned.tokens_kept, unpruned.tokens_kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_batch_equals_one_by_one(model, encoded, name, params, backend):
    policy = make_policy(name, **params)
    together = run(model, encoded, range(len(SENTENCES)), policy, backend, SCHEDULE)
    if name != "none":
        assert len(set(together.exit_layer.tolist())) >= 2, "every row exits together: weak test"
    for i in range(len(SENTENCES)):
        alone = run(model, encoded, [i], policy, backend, SCHEDULE)
        assert alone.exit_layer.item() == together.exit_layer[i].item()
        assert torch.equal(alone.tokens_kept[0], together.tokens_kept[i])
        torch.testing.assert_close(alone.logits[0], together.logits[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_loop_matches_policy_on_pruned_full_depth_logits(model, encoded, name, params):
    """The model's forward with the schedule (the training forward) gives, at every layer, the
    logits the loop computes: pruning does not depend on exits."""
    policy = make_policy(name, **params)
    batch = collate(encoded, range(len(SENTENCES)), 0)
    with torch.inference_mode():
        all_logits = model(*batch, token_pruning=SCHEDULE)
    expected_layer, expected_logits = run_policy(policy, all_logits)
    out = early_exit_forward(model, policy, *batch, token_pruning=SCHEDULE)
    assert out.exit_layer.tolist() == expected_layer.tolist()
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=1e-5)


def test_training_forward_gradients_reach_every_real_token(model, encoded):
    """The training forward is differentiable with the schedule active: every real token gets
    a gradient, padding none (the fusion token's own gradient path is tested on the op in
    tests/test_token_prune.py)."""
    input_ids, attention_mask, token_type_ids = collate(encoded, range(len(SENTENCES)), 0)
    assert SCHEDULE.tokens_per_layer(input_ids.shape[1], 4)[0] < input_ids.shape[1]
    embedded = []
    hook = model.bert.embeddings.register_forward_hook(lambda m, args, out: embedded.append(out))
    try:
        logits = model(input_ids, attention_mask, token_type_ids, token_pruning=SCHEDULE)
    finally:
        hook.remove()
    embedded[0].retain_grad()
    logits.sum().backward()
    reached = embedded[0].grad.abs().sum(-1) > 0
    assert torch.equal(reached, attention_mask.bool())


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_backends_agree(model, encoded, name, params):
    policy = make_policy(name, **params)
    rows = range(len(SENTENCES))
    ref = run(model, encoded, rows, policy, "reference", SCHEDULE)
    got = run(model, encoded, rows, policy, "cpp", SCHEDULE)
    assert torch.equal(got.exit_layer, ref.exit_layer)
    assert torch.equal(got.tokens_kept, ref.tokens_kept)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_pruning_changes_the_outputs_and_counts_tokens(model, encoded):
    """Tokens per layer follow the schedule (0 after the exit layer), and pruning does change
    the logits (so the equalities above are not vacuous)."""
    policy = make_policy("none")
    rows = range(len(SENTENCES))
    pruned = run(model, encoded, rows, policy, "reference", SCHEDULE)
    unpruned = run(model, encoded, rows, policy, "reference", None)
    for i, ids in enumerate(encoded.input_ids):
        assert pruned.tokens_kept[i].tolist() == SCHEDULE.tokens_per_layer(len(ids), 4)
        assert unpruned.tokens_kept[i].tolist() == [len(ids)] * 4
    assert not torch.allclose(pruned.logits, unpruned.logits, atol=1e-3)
    early = run(model, encoded, rows, make_policy("budget", layer=2), "reference", SCHEDULE)
    assert early.tokens_kept[:, 2:].eq(0).all() and early.tokens_kept[:, :2].gt(0).all()


def test_flops_by_hand():
    """H = 4, I = 8, L = 2, C = 2, mean pooling; 5 tokens, pruning at layer 1 with r = 0.5
    keeps ceil(0.5 * 4) = 2 tokens + [CLS] + the fusion of 2 dropped = 4 tokens."""
    counter = FlopCounter(hidden_size=4, intermediate_size=8, num_layers=2, num_labels=2,
                          pooling="mean")  # fmt: skip
    schedule = TokenPruning(layers=(1,), keep_ratio=0.5, beta=(1.0,))
    # Layer 1: QKVO 8*5*16 = 640, scores+context 4*25*4 = 400, FFN on 4 tokens 4*4*4*8 = 512.
    # Pruning: [CLS] row 2*5*4 = 40, fusion 2*2*4 = 16. Head on 4 tokens: 4*4 + 2*4*2 = 32.
    layer1 = 640 + 400 + 512 + 40 + 16 + 32
    # Layer 2 on 4 tokens: 8*4*16 = 512, 4*16*4 = 256, 4*4*4*8 = 512; head 32.
    layer2 = 512 + 256 + 512 + 32
    assert counter.executed(5, 1, schedule) == layer1 == 1640
    assert counter.executed(5, 2, schedule) == layer1 + layer2 == 2952
    # Full model: 2 layers on 5 tokens (640 + 400 + 640 each) and one head (5*4 + 16).
    assert counter.full(5) == 2 * 1680 + 36 == 3396
    assert counter.executed(5, 2, None) == 2 * (1680 + 36)
    assert counter.cumulative(5, schedule) == [1640, 2952]
    executed, full = counter.tables([5, 5], schedule)
    assert executed.tolist() == [[1640, 1640], [2952, 2952]] and full.tolist() == [3396, 3396]
    cls_counter = FlopCounter(4, 8, 2, 2, pooling="cls")
    assert cls_counter.full(5) == 2 * 1680 + 2 * 16 + 16


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint with a token-pruning schedule in eeengine.json."""
    path = tmp_path_factory.mktemp("pruned") / "tiny"
    path.mkdir()
    for file in tiny_ckpt.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((path / "eeengine.json").read_text())
    manifest["token_pruning"] = {"layers": [1, 3], "keep_ratio": 0.6, "beta": [1.0, 0.5]}
    (path / "eeengine.json").write_text(json.dumps(manifest))
    return path


def test_engine_reports_tokens_and_flops(pruned_ckpt):
    engine = Engine(pruned_ckpt, policy="none")
    assert engine.token_pruning == SCHEDULE
    predictions = engine.predict(SENTENCES, batch_size=3)
    lengths = [len(ids) for ids in encode(engine.tokenizer, SENTENCES, None, 64).input_ids]
    counter = FlopCounter.for_model(engine.model)
    for p, length in zip(predictions, lengths, strict=True):
        assert p.tokens_kept == SCHEDULE.tokens_per_layer(length, 4)
        assert p.flops == counter.executed(length, 4, SCHEDULE)
        assert p.full_flops == counter.full(length)
        if length >= 10:  # pruning saves more than the three extra exit heads cost
            assert p.flops < p.full_flops
    off = Engine(pruned_ckpt, policy="none", token_pruning=None).predict(SENTENCES[5])
    assert off.tokens_kept is None and off.flops > off.full_flops  # 4 heads, not 1
    assert Engine(pruned_ckpt, token_pruning=DEFAULT_TOKEN_PRUNING | {"layers": [1, 3]})


def test_engine_evaluate_reports_flops_ratio(pruned_ckpt):
    engine = Engine(pruned_ckpt, policy="none")
    split = Split(texts=SENTENCES, text_pairs=None, labels=[0, 1] * 4)
    result = evaluate(engine, split, "accuracy")
    predictions = engine.predict(SENTENCES)
    ratio = sum(p.flops for p in predictions) / sum(p.full_flops for p in predictions)
    assert result["flops_ratio"] == pytest.approx(ratio) and ratio < 1
    assert result["flops_speedup"] == pytest.approx(1 / ratio)


def test_sweep_flops_ratio_equals_the_engine_at_each_point(pruned_ckpt):
    """ρ of every swept entropy point (from the FLOPs tables and the exits of the full-depth
    pass) is what eeengine.evaluation.evaluate measures running that policy with pruning."""
    engine = Engine(pruned_ckpt, policy="none")
    split = Split(texts=SENTENCES, text_pairs=None, labels=[0, 1] * 4)
    report = sweep_report(engine, "tiny", "dev", split, "accuracy")
    points = report["policies"]["entropy"]
    assert len({round(p["avg_exit_layer"], 6) for p in points}) > 1  # exits vary
    for point in points[:: max(1, len(points) // 4)]:
        measured = Engine(pruned_ckpt, policy="entropy", threshold=point["threshold"])
        result = evaluate(measured, split, "accuracy")
        assert point["avg_exit_layer"] == pytest.approx(result["avg_exit_layer"])
        assert point["flops_ratio"] == pytest.approx(result["flops_ratio"])
        assert point["flops_speedup"] == pytest.approx(result["flops_speedup"])


def test_bad_schedule_in_checkpoint_is_named(pruned_ckpt, tmp_path):
    for file in pruned_ckpt.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((tmp_path / "eeengine.json").read_text())
    manifest["token_pruning"]["layers"] = [1, 9]
    (tmp_path / "eeengine.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"eeengine.json: token_pruning.layers"):
        Engine(tmp_path)


@pytest.mark.parametrize(
    ("backbone", "overrides"),
    [*((b, {}) for b in BACKBONE_TYPES), ("albert", {"num_hidden_groups": 2})],
)
def test_every_backbone_prunes(backbone, overrides):
    """BERT, RoBERTa and ALBERT (shared layer groups of one layer): keep ratio 1 is the
    unpruned model, the loop equals the policy on the pruned full-depth logits, batched
    equals one by one."""
    torch.manual_seed(0)
    config = HF_MODELS[backbone][1](**overrides)
    model = MultiExitBert(config, 3, pooling="cls").eval()
    pad = config.pad_token_id
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (4, 23), generator=gen)
    attention_mask = (torch.arange(23) < torch.tensor([23, 17, 3, 11])[:, None]).long()
    batch = (input_ids.masked_fill(attention_mask == 0, pad), attention_mask, attention_mask * 0)
    policy = make_policy("entropy", threshold=1.05)
    keep_all = TokenPruning((1, 3), 1.0, (1.0, 0.5))
    unpruned = early_exit_forward(model, policy, *batch)
    same = early_exit_forward(model, policy, *batch, token_pruning=keep_all)
    assert torch.equal(same.logits, unpruned.logits)
    with torch.inference_mode():
        expected_layer, expected_logits = run_policy(policy, model(*batch, SCHEDULE))
    together = early_exit_forward(model, policy, *batch, token_pruning=SCHEDULE)
    assert torch.equal(together.exit_layer, expected_layer)
    torch.testing.assert_close(together.logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together.logits, unpruned.logits, atol=1e-4)
    for i, length in enumerate(attention_mask.sum(1).tolist()):
        row = tuple(t[i : i + 1, :length] for t in batch)
        alone = early_exit_forward(model, policy, *row, token_pruning=SCHEDULE)
        assert alone.exit_layer.item() == together.exit_layer[i].item()
        torch.testing.assert_close(alone.logits[0], together.logits[i], atol=1e-5, rtol=1e-5)


def test_albert_with_inner_groups_refuses_a_schedule():
    model = MultiExitBert(HF_MODELS["albert"][1](inner_group_num=2), 2).eval()
    assert not model.backbone.supports_token_pruning
    ones = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="token pruning is not supported by AlbertModel"):
        model(ones, ones, ones * 0, SCHEDULE)


@pytest.mark.skipif(not HAS_C, reason="the ONNX Runtime executor prunes with the C++ op here")
@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_onnxruntime_executor_prunes_as_the_torch_layers(model, encoded, name, params):
    """The ONNX Runtime executor with the pruning layers built as attention and feed-forward
    sessions: same exits, kept tokens and (to float tolerance) logits as the torch layers'
    ``pruned_forward``, on the engine's compaction loop."""
    pytest.importorskip("onnxruntime")
    policy = make_policy(name, **params)
    batch = collate(encoded, range(len(SENTENCES)), 0)
    executor = make_executor("onnxruntime", model, "fp32", SCHEDULE)  # keeps the torch layers
    got = early_exit_forward(
        model, policy, *batch, backend="cpp", token_pruning=SCHEDULE, executor=executor
    )
    ref = early_exit_forward(model, policy, *batch, backend="cpp", token_pruning=SCHEDULE)
    assert got.exit_layer.tolist() == ref.exit_layer.tolist()
    assert torch.equal(got.tokens_kept, ref.tokens_kept)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_C, reason="the ONNX Runtime executor prunes with the C++ op here")
def test_onnxruntime_int8_prunes_to_the_schedule(model, encoded, tokenizer):
    """At int8 and int8_static the kept-token counts are the schedule's (they depend on lengths
    only) and the full-depth logits stay near fp32's."""
    pytest.importorskip("onnxruntime")
    from eeengine.executors.int8_static import activation_absmax

    stats = activation_absmax(model, tokenizer, SENTENCES)
    policy = make_policy("none")
    batch = collate(encoded, range(len(SENTENCES)), 0)
    outs = {
        precision: early_exit_forward(
            model,
            policy,
            *batch,
            backend="cpp",
            token_pruning=SCHEDULE,
            executor=make_executor(
                "onnxruntime",
                model,
                precision,
                SCHEDULE,
                activations=stats if precision == "int8_static" else None,
            ),
        )  # fmt: skip
        for precision in ("fp32", "int8", "int8_static")
    }
    lengths = batch[1].sum(1).tolist()
    expected = [SCHEDULE.tokens_per_layer(n, model.num_layers) for n in lengths]
    for precision in ("int8", "int8_static"):
        assert outs[precision].tokens_kept.tolist() == expected
        torch.testing.assert_close(outs[precision].logits, outs["fp32"].logits, atol=0.1, rtol=0.05)


def test_onnxruntime_executor_refuses_a_layer_not_built_for_pruning(model, encoded):
    pytest.importorskip("onnxruntime")
    batch = collate(encoded, range(len(SENTENCES)), 0)
    executor = make_executor("onnxruntime", model, "fp32")
    with pytest.raises(ValueError, match="layer 1 was built without token pruning"):
        early_exit_forward(
            model, make_policy("none"), *batch, token_pruning=SCHEDULE, executor=executor
        )
