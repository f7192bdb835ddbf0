"""``eeengine serve``: a text-embeddings-inference compatible HTTP server with layer-wise
continuous batching (optional extra ``eeengine[serve]``: FastAPI, uvicorn, prometheus-client).

- :mod:`eeengine.serve.app`: the FastAPI app (``/predict``, ``/health``, ``/info``,
  ``/metrics``, ``/docs``).
- :mod:`eeengine.serve.protocol`: TEI's request, response and errors.
- :mod:`eeengine.serve.batcher`: the model's worker thread and the static batcher.
- :mod:`eeengine.serve.layerwise`: layer-wise continuous batching (one queue per depth).
- :mod:`eeengine.serve.metrics`: Prometheus metrics.
- :mod:`eeengine.serve.cli`: the ``eeengine serve`` command.
"""

# How the server forms batches (``eeengine serve --batching``).
BATCHING = ("continuous", "static")
# Which depth the layer-wise batcher runs next (``eeengine serve --schedule``; see
# :mod:`eeengine.serve.layerwise`).
SCHEDULES = ("fullest", "oldest")
