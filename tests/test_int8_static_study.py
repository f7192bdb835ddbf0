"""benchmarks/int8_static.py's graph, on a tiny random layer: what the study claims of it holds
by construction. Every row's output is the same alone and in a padded batch (the activation
scales are fixed, not taken per call), and the layer stays close to the torch layer it
quantizes (smoothing is an exact rewrite before rounding)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnxruntime  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from int8_static import POINTS, channel_absmax, static_layer_graph  # noqa: E402

from eeengine import Engine  # noqa: E402
from tests.conftest import SENTENCES  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine(tiny_ckpt, policy="none", executor="torch")


def _layer_inputs(engine: Engine, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = engine.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = engine.model.backbone.embeddings(enc["input_ids"], enc["token_type_ids"])
    return hidden, enc["attention_mask"]


def test_absmax_covers_every_point_of_every_layer(engine):
    stats = channel_absmax(engine, SENTENCES, batch_size=3)
    assert len(stats) == engine.num_layers
    hidden_size = engine.model.config.hidden_size
    for layer in stats:
        assert set(layer) == set(POINTS)
        assert layer["qkv"].shape == (hidden_size,)
        assert layer["ffn_out"].shape == (engine.model.config.intermediate_size,)
        assert all(bool((v > 0).all()) for v in layer.values())


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_rows_alone_equal_rows_batched_and_close_to_torch(engine, alpha):
    stats = channel_absmax(engine, SENTENCES)
    layer = engine.model.backbone.layers[0]
    config = engine.model.config
    graph = static_layer_graph(
        layer, config.num_attention_heads, config.layer_norm_eps, stats[0], alpha
    )
    session = onnxruntime.InferenceSession(
        graph.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    hidden, mask = _layer_inputs(engine, SENTENCES)

    def run(h: torch.Tensor, m: torch.Tensor) -> np.ndarray:
        feed = {"hidden_states": h.numpy(), "attention_mask": m.numpy().astype(np.int32)}
        return session.run(None, feed)[0]

    batched = run(hidden, mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        alone = run(hidden[row : row + 1, :length], mask[row : row + 1, :length])
        np.testing.assert_allclose(alone[0], batched[row, :length], rtol=0, atol=1e-5)
    with torch.inference_mode():
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        expected = layer(hidden, bias).numpy()
    real = mask.bool().numpy()
    error = np.abs(batched - expected)[real].mean()
    assert error < 2e-3, f"mean error {error:.5f} against the torch layer"
