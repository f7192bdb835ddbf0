"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own.

Names follow text-embeddings-inference's (``te_request_duration`` ...) with the prefix
``eeengine_`` and units in the name; what is specific to early exit: the exit layer of every
input, and the layers it computed against the full depth (their ratio is the layer saving the
server achieved on live traffic).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: 1 ms to 10 s.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """Counters and histograms of one server; thread-safe (the model's worker thread updates
    them too).

    Args:
        num_layers: depth of the served model (the exit-layer histogram has one bucket per
            layer).
    """

    def __init__(self, num_layers: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eeengine_requests",
            "HTTP /predict requests by outcome: ok, client_error (4xx), overloaded (429), "
            "cancelled (client disconnected), error (5xx)",
            ["outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "eeengine_request_duration_seconds",
            "/predict wall time, request received to response",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_duration = Histogram(
            "eeengine_queue_duration_seconds",
            "per request: submitted to the first layer call that runs its inputs",
            buckets=_LATENCY,
            registry=r,
        )
        self.inference_duration = Histogram(
            "eeengine_inference_duration_seconds",
            "per request: first layer call to the exit of its last input",
            buckets=_LATENCY,
            registry=r,
        )
        self.in_flight = Gauge(
            "eeengine_requests_in_flight",
            "/predict requests received and not yet answered",
            registry=r,
        )
        self.queue_size = Gauge(
            "eeengine_queue_size", "inputs waiting for their next layer, all depths", registry=r
        )
        self.batch_size = Histogram(
            "eeengine_batch_size",
            "inputs per model call (a layer call, or a whole batch with the static batcher)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "eeengine_batch_tokens",
            "padded tokens per model call (inputs x longest input)",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.exit_layer = Histogram(
            "eeengine_exit_layer",
            "1-based layer each input exited at",
            buckets=tuple(range(1, num_layers + 1)),
            registry=r,
        )
        self.layers_computed = Counter(
            "eeengine_layers_computed",
            "encoder layers run, summed over inputs (sum of exit layers)",
            registry=r,
        )
        self.layers_full_depth = Counter(
            "eeengine_layers_full_depth",
            "encoder layers full depth would have run (inputs x num_layers)",
            registry=r,
        )
        self.num_layers = num_layers

    def observe_exit(self, exit_layer: int) -> None:
        """One input exited at ``exit_layer`` (1-based)."""
        self.exit_layer.observe(exit_layer)
        self.layers_computed.inc(exit_layer)
        self.layers_full_depth.inc(self.num_layers)

    def observe_batch(self, rows: int, seq_len: int) -> None:
        """One model call on ``rows`` inputs padded to ``seq_len`` tokens."""
        self.batch_size.observe(rows)
        self.batch_tokens.observe(rows * seq_len)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
