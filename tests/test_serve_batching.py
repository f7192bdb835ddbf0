"""The server's batchers against ``Engine.predict``: every request gets the logits and exit
layers the engine gives it alone, whatever it was batched with and whenever it arrived.

The worker loop is driven by hand here (admit, one model call, admit ...), so hypothesis
controls the interleaving: which requests arrive between two model calls, and the batch limits
(which split queues across calls).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eeengine import Engine  # noqa: E402
from eeengine.checkpoint import save_checkpoint  # noqa: E402
from eeengine.serve.batcher import Batcher, Job, StaticBatcher  # noqa: E402
from eeengine.serve.layerwise import LayerwiseBatcher  # noqa: E402
from eeengine.serve.metrics import ServeMetrics  # noqa: E402
from eeengine.serve.protocol import tokenize  # noqa: E402
from tests.conftest import SENTENCES, make_tiny_model, tiny_manifest  # noqa: E402

TEXTS = [*SENTENCES, "bad", "an utterly forgettable sequel , loud and empty", "fine"]
PAIRS = [(a, b) for a, b in zip(SENTENCES, reversed(SENTENCES), strict=True)]

# Policies with per-row state of different kinds: none kept (entropy), a counter (pcee), the
# last predictions (elbert), a logits memory (mpee); and token pruning (memory, pruned widths).
# Thresholds where the tiny model's rows exit at different layers (1, 2, 4 on these texts).
ENGINES = {
    "entropy": {"threshold": 0.5},
    "pcee": {"policy": "pcee", "threshold": 0.8, "patience": 2},
    "elbert": {"policy": "elbert", "threshold": 0.7, "window": 3},
    "mpee": {"policy": "mpee", "threshold": 0.5},
    "pruning": {
        "threshold": 0.5,
        "token_pruning": {"layers": [2], "keep_ratio": 0.6, "beta": [1.0]},
    },
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request, tiny_ckpt) -> Engine:
    return Engine(tiny_ckpt, **ENGINES[request.param])


def _job(engine: Engine, inputs: list) -> Job:
    examples = [(x, None) if isinstance(x, str) else x for x in inputs]
    return Job(*tokenize(engine.tokenizer, examples, engine.max_length, truncate=True))


def _batcher(
    kind: str,
    engine: Engine,
    max_batch_tokens: int,
    max_batch_requests: int | None,
    schedule: str = "fullest",
    max_wait_ms: float | None = None,
):
    limits = dict(
        num_layers=engine.num_layers,
        pad_token_id=engine.tokenizer.pad_token_id,
        device=engine.device,
        max_batch_tokens=max_batch_tokens,
        max_batch_requests=max_batch_requests,
        metrics=ServeMetrics(engine.num_layers),
        # "...-cut": every cut that saves padding is made
        split_cost=0 if kind.endswith("-cut") else math.inf,
    )
    loop = engine.exit_loop()
    if kind.startswith("static"):
        return StaticBatcher(
            lambda *b: (lambda o: (o.logits, o.exit_layer))(loop.run(*b)), **limits
        )
    return LayerwiseBatcher(loop, schedule, max_wait_ms, **limits)


def _drive(batcher: Batcher, arrivals: list[list[Job]]) -> None:
    """Submit ``arrivals[k]`` before the k-th model call, then run until all is done."""
    with torch.inference_mode():
        for jobs in arrivals:
            for job in jobs:
                batcher.submit(job)
            batcher._admit(block=False)
            if batcher._has_work():
                batcher._iteration()
        while batcher._has_work():
            batcher._iteration()


def _assert_matches_engine(engine: Engine, job: Job, inputs: list) -> None:
    result = job.future.result(timeout=0)
    expected = engine.predict(list(inputs))
    assert result.exit_layer == [p.exit_layer for p in expected]
    torch.testing.assert_close(
        torch.tensor(result.logits),
        torch.tensor([p.logits for p in expected]),
        atol=1e-5,
        rtol=1e-5,
    )


def _histogram_sum_and_count(histogram) -> tuple[float, float]:
    samples = histogram.collect()[0].samples
    total = next(s.value for s in samples if s.name.endswith("_sum"))
    return total, next(s.value for s in samples if s.name.endswith("_count"))


requests_strategy = st.lists(
    st.lists(st.sampled_from(TEXTS), min_size=1, max_size=4)
    | st.lists(st.sampled_from(PAIRS), min_size=1, max_size=2),
    min_size=1,
    max_size=6,
)


@pytest.mark.parametrize(
    "kind, schedule, max_wait_ms",
    [
        ("continuous", "fullest", None),
        ("continuous", "fullest", 0.0),  # every input is overdue: the oldest always runs
        ("continuous", "oldest", None),
        ("continuous-cut", "fullest", None),
        ("static", "fullest", None),
        ("static-cut", "fullest", None),
    ],
)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=requests_strategy,
    gaps=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    max_batch_tokens=st.sampled_from([64, 100, 400, 16384]),
    max_batch_requests=st.sampled_from([None, 1, 3]),
)
def test_results_equal_engine_predict(
    engine, kind, schedule, max_wait_ms, requests, gaps, max_batch_tokens, max_batch_requests
) -> None:
    batcher = _batcher(kind, engine, max_batch_tokens, max_batch_requests, schedule, max_wait_ms)
    jobs = [_job(engine, inputs) for inputs in requests]
    arrivals: list[list[Job]] = []
    for job, gap in zip(jobs, gaps, strict=False):  # ``gap`` model calls before this arrival
        arrivals += [[] for _ in range(gap)] + [[job]]
    _drive(batcher, arrivals)
    for job, inputs in zip(jobs, requests, strict=True):
        _assert_matches_engine(engine, job, inputs)


@pytest.mark.parametrize("kind", ["continuous", "continuous-cut"])
def test_layerwise_merges_depths_across_requests(tiny_ckpt, kind) -> None:
    """Rows of different requests at the same depth run in one layer call: with a request
    arriving between every call, the calls still carry rows of several requests (with the
    cut too: these sentences differ by a few tokens, less padding than a call costs). The
    torch executor: with ONNX Runtime the first input, alone, would run in one call."""
    engine = Engine(tiny_ckpt, policy="none", executor="torch")  # every row runs every layer
    batcher = _batcher(kind, engine, 16384, None)
    batcher.split_cost = engine.split_cost if kind.endswith("-cut") else math.inf
    jobs = [_job(engine, [text]) for text in TEXTS[:4]]
    _drive(batcher, [[job] for job in jobs])
    total, count = _histogram_sum_and_count(batcher.metrics.batch_size)
    # 4 requests x 4 layers = 16 rows run; without merging that takes 16 calls
    assert total == 16 and count < 16
    for job, text in zip(jobs, TEXTS[:4], strict=True):
        _assert_matches_engine(engine, job, [text])


@pytest.mark.parametrize(
    "schedule, max_wait_ms, runs_next",
    [
        ("fullest", None, 0),  # 3 new inputs outnumber the 1 waiting for layer 2
        ("fullest", 1e6, 0),  # nobody has waited that long yet
        ("fullest", 0.0, 1),  # the input at depth 1 is overdue: it runs first
        ("oldest", None, 1),
    ],
)
def test_schedule_picks_the_next_depth(tiny_ckpt, schedule, max_wait_ms, runs_next) -> None:
    # Every row runs every layer, layer by layer (the torch executor has no row graph).
    engine = Engine(tiny_ckpt, policy="none", executor="torch")
    batcher = _batcher("continuous", engine, 16384, None, schedule, max_wait_ms)
    with torch.inference_mode():
        batcher.submit(_job(engine, TEXTS[:1]))
        batcher._admit(block=False)
        batcher._iteration()  # layer 1 of the first request: it waits for layer 2
        batcher.submit(_job(engine, TEXTS[1:4]))
        batcher._admit(block=False)
        assert batcher._pick() == runs_next


def test_unknown_schedule(tiny_ckpt) -> None:
    with pytest.raises(ValueError, match="unknown schedule 'deadline'"):
        _batcher("continuous", Engine(tiny_ckpt), 16384, None, "deadline")


def test_cancelled_job_leaves_the_queues(tiny_ckpt) -> None:
    engine = Engine(tiny_ckpt, policy="none")
    batcher = _batcher("continuous", engine, 16384, None)
    kept, dropped = _job(engine, TEXTS[:2]), _job(engine, TEXTS[2:5])
    with torch.inference_mode():
        batcher.submit(kept)
        batcher.submit(dropped)
        batcher._admit(block=False)
        batcher._iteration()  # layer 1 for both
        dropped.cancelled = True
        while batcher._has_work():
            batcher._iteration()
    assert not dropped.future.done()
    assert dropped.exit_layer == [0, 0, 0]  # never finished: its rows were dropped
    _assert_matches_engine(engine, kept, TEXTS[:2])
    assert _histogram_sum_and_count(batcher.metrics.batch_size)[0] == 5 + 2 * 3


@pytest.mark.parametrize("kind", ["continuous", "static"])
def test_stop_drains_work_in_flight_then_ends(tiny_ckpt, kind) -> None:
    """A stop that arrives while inputs are still running (SIGTERM under load): the worker
    answers them, then its thread ends (it used to wait forever for a second stop)."""
    engine = Engine(tiny_ckpt, policy="none")
    batcher = _batcher(kind, engine, 16384, 1)  # one input per call: work stays queued
    job = _job(engine, TEXTS[:4])
    batcher.submit(job)
    batcher.submit(None)  # the stop marker, queued behind the job
    batcher.start()
    batcher._thread.join(timeout=60)
    assert not batcher.alive
    _assert_matches_engine(engine, job, TEXTS[:4])


def test_static_batch_cut_where_padding_costs_more(tiny_ckpt) -> None:
    engine = Engine(tiny_ckpt)
    long_text = " ".join([TEXTS[0]] * 8)
    inputs = [TEXTS[1], long_text, TEXTS[2], TEXTS[1]]
    for split_cost, calls_expected in ((math.inf, 1), (engine.split_cost, 2)):
        batcher = _batcher("static", engine, 16384, None)
        batcher.split_cost = split_cost
        calls = []
        run = batcher._run_batch
        batcher._run_batch = lambda *b, run=run, calls=calls: calls.append(b[0].shape) or run(*b)
        job = _job(engine, inputs)
        _drive(batcher, [[job]])
        assert len(calls) == calls_expected
        _assert_matches_engine(engine, job, inputs)
    assert calls[0][0] == 1 and calls[1][0] == 3  # the long input alone, then the short ones


def _failing_first_call(call, rows_of):
    """``call`` that raises on its first call, and the rows each call was given."""
    rows_run = []

    def wrapped(*args, **kwargs):
        rows_run.append(rows_of(args[0]))
        if len(rows_run) == 1:
            raise RuntimeError("boom")
        return call(*args, **kwargs)

    return wrapped, rows_run


@pytest.mark.parametrize("kind", ["static-cut", "continuous-cut"])
def test_a_failed_call_of_a_cut_batch_drops_its_jobs_other_rows(tiny_ckpt, kind) -> None:
    engine = Engine(tiny_ckpt, policy="none")
    batcher = _batcher(kind, engine, 16384, None)
    if kind.startswith("static"):  # a model call runs every layer
        batcher._run_batch, rows_run = _failing_first_call(batcher._run_batch, lambda x: len(x))
        calls_left = 1
    else:  # a model call is one layer
        batcher._loop.step, rows_run = _failing_first_call(
            batcher._loop.step, lambda live: len(live.hidden_states)
        )
        calls_left = engine.num_layers
    failing = _job(engine, [" ".join([TEXTS[0]] * 8), TEXTS[1]])  # runs first: the longest
    other = _job(engine, [TEXTS[2]])
    _drive(batcher, [[failing, other]])
    with pytest.raises(RuntimeError, match="boom"):
        failing.future.result(timeout=0)
    _assert_matches_engine(engine, other, [TEXTS[2]])
    # the long input (fails), then TEXTS[2] alone: TEXTS[1] of the failed job never runs
    assert rows_run == [1] * (1 + calls_left)


def test_failed_model_call_fails_only_its_jobs(tiny_ckpt) -> None:
    engine = Engine(tiny_ckpt)
    calls = []

    def run_batch(*batch):
        calls.append(batch[0].shape[0])
        if len(calls) == 1:
            raise RuntimeError("boom")
        out = engine.exit_loop().run(*batch)
        return out.logits, out.exit_layer

    limits = dict(
        num_layers=engine.num_layers,
        pad_token_id=0,
        device=engine.device,
        max_batch_tokens=16384,
        max_batch_requests=1,
        metrics=ServeMetrics(engine.num_layers),
    )
    batcher = StaticBatcher(run_batch, **limits)
    first, second = _job(engine, [TEXTS[0]]), _job(engine, [TEXTS[1]])
    _drive(batcher, [[first, second]])
    with pytest.raises(RuntimeError, match="boom"):
        first.future.result(timeout=0)
    _assert_matches_engine(engine, second, [TEXTS[1]])


def test_checkpoint_with_pruning_schedule(tmp_path, tiny_bert_dir, tokenizer) -> None:
    """The checkpoint's own schedule (Engine's default) is what the server runs."""
    manifest = tiny_manifest()
    manifest["token_pruning"] = {"layers": [2, 3], "keep_ratio": 0.7, "beta": [1.0, 0.5]}
    path = save_checkpoint(tmp_path / "ckpt", make_tiny_model(tiny_bert_dir), tokenizer, manifest)
    engine = Engine(path)
    assert engine.token_pruning is not None
    batcher = _batcher("continuous", engine, 16384, 2)
    jobs = [_job(engine, TEXTS[i : i + 3]) for i in range(0, 9, 3)]
    _drive(batcher, [[jobs[0]], [], [jobs[1]], [jobs[2]]])
    for i, job in enumerate(jobs):
        _assert_matches_engine(engine, job, TEXTS[3 * i : 3 * i + 3])


def test_layerwise_cuts_where_padding_costs_more(tiny_ckpt) -> None:
    """One long input among short ones: cut, every layer runs it alone and the short ones
    together at their own width; not cut, every layer pads the short ones to it."""
    engine = Engine(tiny_ckpt, policy="none")  # every row runs every layer
    long_text = " ".join([TEXTS[0]] * 8)
    inputs = [TEXTS[1], long_text, TEXTS[2], TEXTS[1]]
    lengths = [len(ids) for ids in _job(engine, inputs).input_ids]
    short = max(lengths[:1] + lengths[2:])
    assert 3 * (lengths[1] - short) > engine.split_cost  # the cut pays here
    for kind, calls, tokens in (
        ("continuous", 1, 4 * lengths[1]),
        ("continuous-cut", 2, lengths[1] + 3 * short),
    ):
        batcher = _batcher(kind, engine, 16384, None)
        batcher.split_cost = engine.split_cost if kind.endswith("-cut") else math.inf
        job = _job(engine, inputs)
        _drive(batcher, [[job]])
        _assert_matches_engine(engine, job, inputs)
        assert _histogram_sum_and_count(batcher.metrics.batch_size) == (
            4 * engine.num_layers,
            calls * engine.num_layers,
        )
        assert _histogram_sum_and_count(batcher.metrics.batch_tokens)[0] == (
            tokens * engine.num_layers
        )


@pytest.mark.parametrize("executor", ["onnxruntime", "torch"])
def test_one_input_alone_runs_the_whole_loop_in_one_call(tiny_ckpt, executor) -> None:
    """Alone in the server, an input runs as one call where the executor has a row graph
    (ONNX Runtime; from the second such input on, which builds it), layer by layer otherwise;
    the answer is the engine's either way."""
    engine = Engine(tiny_ckpt, executor=executor, policy="none")  # every layer runs
    batcher = _batcher("continuous", engine, 16384, None)
    jobs = [_job(engine, [text]) for text in TEXTS[:3]]
    for job, text in zip(jobs, TEXTS, strict=False):
        _drive(batcher, [[job]])
        _assert_matches_engine(engine, job, [text])
    _, calls = _histogram_sum_and_count(batcher.metrics.batch_size)
    layers = engine.num_layers
    assert calls == (layers + 2 if executor == "onnxruntime" else 3 * layers)
