"""The contrastive stage (SetFit's first stage): the pair loss against hand-computed values,
balanced seeded pairs, and the stage on a tiny random model (the encoder learns, the heads
are untouched, the run is deterministic). Nothing real is trained."""

import math
from collections import Counter

import pytest
import torch

from eeengine.batching import encode
from eeengine.training.contrastive import (
    contrastive_steps,
    contrastive_tune,
    cosine_pair_loss,
    make_pairs,
)
from tests.conftest import SENTENCES, make_tiny_model


def test_loss_is_the_mse_of_cosine_similarity_to_the_target():
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
    second = torch.tensor([[2.0, 2.0], [0.0, 5.0], [1.0, 0.0]])
    target = torch.tensor([1.0, 0.0, 0.0])
    # cosines 1/sqrt(2), 0 and -1 against 1, 0 and 0
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + 0.0 + 1.0) / 3
    assert cosine_pair_loss(first, second, target).item() == pytest.approx(expected, abs=1e-6)
    same = cosine_pair_loss(first, first * 7, torch.ones(3))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_pairs_are_balanced_labelled_and_seeded():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    pairs = make_pairs(labels, rounds=3, seed=5)
    assert len(pairs) == 2 * 3 * len(labels) == contrastive_steps(len(labels), 3, 1)
    assert Counter(target for _, _, target in pairs) == {1.0: 30, 0.0: 30}
    for first, second, target in pairs:
        assert first != second
        assert (labels[first] == labels[second]) == (target == 1.0)
    # every row leads one positive and one negative pair a round
    assert Counter((first, target) for first, _, target in pairs) == {
        (row, target): 3 for row in range(len(labels)) for target in (0.0, 1.0)
    }
    assert make_pairs(labels, 3, seed=5) == pairs
    assert make_pairs(labels, 3, seed=6) != pairs


def test_partners_are_drawn_from_every_candidate():
    labels = [0, 0, 0, 1, 1, 1]
    pairs = make_pairs(labels, rounds=200, seed=0)
    positives = Counter((a, b) for a, b, t in pairs if t == 1.0 and a == 0)
    negatives = Counter((a, b) for a, b, t in pairs if t == 0.0 and a == 0)
    assert set(positives) == {(0, 1), (0, 2)} and min(positives.values()) > 70
    assert set(negatives) == {(0, 3), (0, 4), (0, 5)} and min(negatives.values()) > 45


def test_a_lone_row_gets_no_positive_and_one_class_no_negative():
    pairs = make_pairs([0, 0, 1], rounds=1, seed=0)
    assert sorted(t for a, _, t in pairs if a == 2) == [0.0]
    assert all(t == 1.0 for _, _, t in make_pairs([4, 4, 4], rounds=2, seed=0))


@pytest.mark.parametrize("exits", ["last", "all"])
def test_stage_trains_the_encoder_only_and_is_deterministic(tiny_bert_dir, tokenizer, exits):
    encoded = encode(tokenizer, SENTENCES, None, 64)
    labels = [0, 1, 0, 1, 1, 0, 0, 1]  # opinion of each sentence
    runs = []
    for _ in range(2):
        model = make_tiny_model(tiny_bert_dir)
        heads = {k: v.clone() for k, v in model.exit_heads.state_dict().items()}
        before = {k: v.clone() for k, v in model.bert.state_dict().items()}
        torch.manual_seed(0)
        record = contrastive_tune(
            model,
            encoded,
            labels,
            tokenizer.pad_token_id,
            rounds=40,
            lr=1e-3,
            batch_size=8,
            exits=exits,
            seed=3,
        )
        assert model.training
        assert all(torch.equal(v, heads[k]) for k, v in model.exit_heads.state_dict().items())
        assert any(not torch.equal(v, before[k]) for k, v in model.bert.state_dict().items())
        runs.append((record, model.bert.state_dict()))
    (record, weights), (again, weights_again) = runs
    assert record == again and all(torch.equal(v, weights_again[k]) for k, v in weights.items())
    assert record["pairs"] == 640 and record["steps"] == 80
    assert record["last_loss"] < record["first_loss"] / 2  # the pairs are learnt


def test_unknown_exits_are_refused(tiny_bert_dir, tokenizer):
    model = make_tiny_model(tiny_bert_dir)
    encoded = encode(tokenizer, SENTENCES[:2], None, 64)
    with pytest.raises(ValueError, match="contrastive exits 'middle'"):
        contrastive_tune(
            model, encoded, [0, 1], 0, rounds=1, lr=1e-5, batch_size=2, exits="middle", seed=0
        )


def test_frozen_parameters_stay(tiny_bert_dir, tokenizer):
    model = make_tiny_model(tiny_bert_dir)
    table = "bert.embeddings.word_embeddings.weight"
    before = model.state_dict()[table].clone()
    contrastive_tune(
        model,
        encode(tokenizer, SENTENCES, None, 64),
        [0, 1, 0, 1, 1, 0, 0, 1],
        tokenizer.pad_token_id,
        rounds=2,
        lr=1e-3,
        batch_size=8,
        exits="last",
        seed=0,
        frozen={table},
    )
    weights = dict(model.named_parameters())
    assert torch.equal(weights[table], before) and weights[table].grad is None
    assert not weights[table].requires_grad
