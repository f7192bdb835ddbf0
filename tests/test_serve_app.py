"""``eeengine serve``'s HTTP API: text-embeddings-inference's /predict (shapes, scores, errors),
/health, /info, /metrics, 429 on overload, against Engine.predict on a tiny checkpoint."""

from __future__ import annotations

import math
import threading
import time

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from eeengine import Engine  # noqa: E402
from eeengine.serve.app import ServeConfig, ServedModel, create_app, engine_app  # noqa: E402
from eeengine.serve.batcher import StaticBatcher  # noqa: E402
from tests.conftest import SENTENCES  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_ckpt) -> Engine:
    return Engine(tiny_ckpt, threshold=0.5)  # rows exit at layers 1, 2 and 4


def _ready(client: TestClient) -> TestClient:
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return client
        time.sleep(0.01)
    raise AssertionError("server never became healthy")


@pytest.fixture(scope="module", params=["continuous", "static"])
def client(request, engine):
    app = engine_app(engine, ServeConfig(batching=request.param, max_client_batch_size=8))
    with TestClient(app) as client:
        yield _ready(client)


def _check_prediction(answer: list[dict], expected, label_names: list[str]) -> None:
    """TEI's shape: every label once, highest score first; softmax probabilities."""
    assert [set(p) for p in answer] == [{"score", "label", "exit_layer"}] * len(label_names)
    assert sorted(p["label"] for p in answer) == sorted(label_names)
    scores = [p["score"] for p in answer]
    assert scores == sorted(scores, reverse=True)
    assert math.isclose(sum(scores), 1.0, rel_tol=1e-5)
    assert answer[0]["label"] == expected.label
    assert {p["exit_layer"] for p in answer} == {expected.exit_layer}
    assert math.isclose(answer[0]["score"], expected.score, rel_tol=1e-5)


def test_single_text(client, engine) -> None:
    response = client.post("/predict", json={"inputs": SENTENCES[0]})
    assert response.status_code == 200, response.text
    _check_prediction(response.json(), engine.predict(SENTENCES[0]), engine.label_names)
    for header in ("x-total-time", "x-queue-time", "x-inference-time", "x-tokenization-time"):
        assert int(response.headers[header]) >= 0


def test_one_input_as_list_and_pair(client, engine) -> None:
    single = client.post("/predict", json={"inputs": [SENTENCES[1]]}).json()
    _check_prediction(single, engine.predict(SENTENCES[1]), engine.label_names)
    pair = client.post("/predict", json={"inputs": SENTENCES[2:4]}).json()
    _check_prediction(pair, engine.predict(tuple(SENTENCES[2:4])), engine.label_names)


def test_batch_of_texts_and_pairs(client, engine) -> None:
    inputs = [[SENTENCES[0]], [SENTENCES[1], SENTENCES[2]], [SENTENCES[3]], [SENTENCES[5]]]
    response = client.post("/predict", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == len(inputs)
    expected = [engine.predict(x[0]) if len(x) == 1 else engine.predict(tuple(x)) for x in inputs]
    for answer, e in zip(answers, expected, strict=True):
        _check_prediction(answer, e, engine.label_names)
    assert len({e.exit_layer for e in expected}) > 1  # the batch's inputs exit apart


def test_raw_scores_are_the_exit_logits(client, engine) -> None:
    answer = client.post("/predict", json={"inputs": SENTENCES[4], "raw_scores": True}).json()
    expected = engine.predict(SENTENCES[4])
    by_label = {p["label"]: p["score"] for p in answer}
    torch.testing.assert_close(
        torch.tensor([by_label[name] for name in engine.label_names]),
        torch.tensor(expected.logits),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("words", [80, 100_000])  # over 64 tokens; over the character cut
def test_truncate(client, engine, words) -> None:
    long_text = " ".join(["wonderful"] * words)
    refused = client.post("/predict", json={"inputs": long_text})
    assert refused.status_code == 413
    assert refused.json()["error_type"] == "validation"
    assert "truncate" in refused.json()["error"]
    cut = client.post("/predict", json={"inputs": long_text, "truncate": True})
    assert cut.status_code == 200
    with pytest.warns(UserWarning, match="truncated"):
        expected = engine.predict(long_text)
    _check_prediction(cut.json(), expected, engine.label_names)


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b'{"inputs": "unterminated', 422, "validation"),
        (b"[1, 2]", 422, "validation"),
        (b'{"text": "no inputs field"}', 422, "validation"),
        (b'{"inputs": 42}', 422, "validation"),
        (b'{"inputs": ["a", 3]}', 422, "validation"),
        (b'{"inputs": "a", "truncate": "maybe"}', 422, "validation"),
        (b'{"inputs": ["a", "b", "c"]}', 422, "validation"),
        (b'{"inputs": [["a", "b", "c"]]}', 422, "validation"),
        (b'{"inputs": "lone \\ud800 surrogate"}', 422, "validation"),
        (b'{"inputs": ""}', 400, "empty"),
        (b'{"inputs": [["ok"], ["   "]]}', 400, "empty"),
        (b'{"inputs": []}', 400, "empty"),
        (
            b'{"inputs": [["a"], ["b"], ["c"], ["d"], ["e"], ["f"], ["g"], ["h"], ["i"]]}',
            413,
            "validation",
        ),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(client, engine, body, status, error_type) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
    assert response.json()["error"]
    # and the server still answers the next request correctly
    ok = client.post("/predict", json={"inputs": SENTENCES[0]})
    _check_prediction(ok.json(), engine.predict(SENTENCES[0]), engine.label_names)


def test_info_metrics_and_docs(client, engine) -> None:
    info = client.get("/info").json()
    assert info["labels"] == engine.label_names
    assert info["num_layers"] == engine.num_layers
    assert info["backend"] == engine.backend and info["executor"] == engine.executor
    assert info["policy"] == repr(engine.policy) and info["precision"] == "fp32"
    assert info["max_input_length"] == engine.max_length
    assert info["batching"] in ("continuous", "static")
    assert engine.executor == "onnxruntime"  # the CPU default for a BERT checkpoint
    assert info["row_graph"] == {"available": True, "reason": None}

    before = _exit_counts(client)
    texts = SENTENCES[:6]
    client.post("/predict", json={"inputs": [[t] for t in texts]})
    after = _exit_counts(client)
    layers = [p.exit_layer for p in engine.predict(texts)]
    assert after["count"] - before["count"] == len(texts)
    assert after["computed"] - before["computed"] == sum(layers)
    assert after["full"] - before["full"] == len(texts) * engine.num_layers
    text = client.get("/metrics").text
    for name in (
        "eeengine_request_duration_seconds_bucket",
        "eeengine_queue_duration_seconds_bucket",
        "eeengine_inference_duration_seconds_bucket",
        "eeengine_queue_size",
        "eeengine_requests_in_flight",
        "eeengine_batch_size_bucket",
        "eeengine_batch_tokens_bucket",
    ):
        assert name in text
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def _exit_counts(client: TestClient) -> dict:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith("#") and line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return {
        "count": values["eeengine_exit_layer_count"],
        "computed": values["eeengine_layers_computed_total"],
        "full": values["eeengine_layers_full_depth_total"],
    }


def test_health_503_until_warm_and_429_when_full(engine) -> None:
    """A model call held back by an event: /health says 503 while the warm-up cannot finish,
    and with max_concurrent_requests=1 a second request gets 429 at once."""
    release = threading.Event()
    loop = engine.exit_loop()

    def run_batch(*batch):
        release.wait(timeout=30)
        out = loop.run(*batch)
        return out.logits, out.exit_layer

    model = ServedModel(engine.tokenizer, engine.label_names, engine.num_layers, engine.max_length)
    app = create_app(
        model,
        ServeConfig(max_concurrent_requests=1),
        lambda **limits: StaticBatcher(run_batch, device=engine.device, **limits),
    )
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error_type"] == "unhealthy"
        assert client.post("/predict", json={"inputs": "early"}).status_code == 503
        release.set()
        _ready(client)
        release.clear()
        first: dict = {}
        thread = threading.Thread(
            target=lambda: first.update(r=client.post("/predict", json={"inputs": "slow"}))
        )
        thread.start()
        for _ in range(500):  # until the first request is in flight
            if "eeengine_batch_size_count 2.0" in client.get("/metrics").text:
                break
            time.sleep(0.01)
        started = time.perf_counter()
        overloaded = client.post("/predict", json={"inputs": "one too many"})
        assert overloaded.status_code == 429 and overloaded.json()["error_type"] == "overloaded"
        assert time.perf_counter() - started < 5  # at once, not after the first one
        release.set()
        thread.join(timeout=30)
        assert first["r"].status_code == 200


def test_limits_are_checked(engine) -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        engine_app(engine, ServeConfig(max_batch_tokens=engine.max_length - 1))
    with pytest.raises(ValueError, match="batching"):
        engine_app(engine, ServeConfig(batching="dynamic"))


def test_non_finite_logits_are_an_error_not_an_answer(engine) -> None:
    """As Engine.predict: NaN logits give no prediction (500, the model failed), and the
    server goes on answering."""
    loop = engine.exit_loop()

    def run_batch(input_ids, *rest):
        out = loop.run(input_ids, *rest)
        poisoned = (input_ids == engine.tokenizer.convert_tokens_to_ids("nan")).any(1)
        out.logits[poisoned] = float("nan")
        return out.logits, out.exit_layer

    model = ServedModel(engine.tokenizer, engine.label_names, engine.num_layers, engine.max_length)
    app = create_app(
        model,
        ServeConfig(),
        lambda **limits: StaticBatcher(run_batch, device=engine.device, **limits),
    )
    with TestClient(app) as client:
        _ready(client)
        bad = client.post("/predict", json={"inputs": "nan"})
        assert bad.status_code == 500 and bad.json()["error_type"] == "backend"
        assert "non-finite" in bad.json()["error"]
        ok = client.post("/predict", json={"inputs": SENTENCES[0]})
        _check_prediction(ok.json(), engine.predict(SENTENCES[0]), engine.label_names)


def test_serve_command_runs_the_precision_it_is_given(tiny_ckpt, monkeypatch) -> None:
    """``eeengine serve --precision int8`` serves int8 layers (ONNX Runtime), and says so."""
    pytest.importorskip("onnxruntime")
    import eeengine.serve.app as app_module
    from eeengine.cli import main

    served = {}
    monkeypatch.setattr(app_module, "run", lambda app, *args: served.update(app=app))
    main(["serve", "--ckpt", str(tiny_ckpt), "--precision", "int8"])
    with TestClient(served["app"]) as client:
        info = _ready(client).get("/info").json()
        answer = client.post("/predict", json={"inputs": SENTENCES[0]}).json()
    assert info["precision"] == "int8" and info["executor"] == "onnxruntime"
    assert info["row_graph"] == {"available": True, "reason": None}
    engine = Engine(tiny_ckpt, precision="int8")
    _check_prediction(answer, engine.predict(SENTENCES[0]), engine.label_names)


def test_info_says_why_lone_requests_run_layer_by_layer(tiny_ckpt) -> None:
    engine = Engine(tiny_ckpt, executor="torch")
    with TestClient(engine_app(engine, ServeConfig())) as client:
        info = _ready(client).get("/info").json()
    reason = "the torch executor runs every batch layer by layer"
    assert info["row_graph"] == {"available": False, "reason": reason}


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_serve_command_cuts_with_the_split_cost_it_is_given(
    tiny_ckpt, monkeypatch, capsys, batching
) -> None:
    import eeengine.serve.app as app_module
    from eeengine.cli import main

    served = {}
    monkeypatch.setattr(app_module, "run", lambda app, *args: served.update(app=app))
    command = ["serve", "--ckpt", str(tiny_ckpt), "--batching", batching]
    main(command)
    default = Engine(tiny_ckpt).split_cost
    assert served["app"].state.batcher.split_cost == default
    with TestClient(served["app"]) as client:  # /info: the cost in use (null: never cut)
        assert _ready(client).get("/info").json()["split_cost"] == default
    main([*command, "--split-cost", "inf"])
    assert served["app"].state.batcher.split_cost == math.inf
    with TestClient(served["app"]) as client:
        assert _ready(client).get("/info").json()["split_cost"] is None
    assert main([*command, "--split-cost", "-1"]) == 2
    assert "split_cost (-1.0) must be a number of padded tokens >= 0" in capsys.readouterr().err
