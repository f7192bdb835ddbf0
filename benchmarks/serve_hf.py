"""The Hugging Face baseline server of ``serve_load.py``: what a user writes today.

The same FastAPI app as ``eeengine serve`` (:func:`eeengine.serve.app.create_app`: TEI's
``/predict``, the same limits, the same worker thread) with TEI-style dynamic batching (the
static batcher: queued inputs that fit the limits form a batch that runs to completion), running
Hugging Face ``transformers.BertModel`` (SDPA attention) at full depth with the checkpoint's last
exit head (:class:`peers.FullDepth`), every input answered at the last layer.

    python benchmarks/serve_hf.py --ckpt ~/.cache/eeengine/sst2-minilm-l6-v1 --port 8081
"""

from __future__ import annotations

import argparse

import torch
from peers import FullDepth

from eeengine import Engine
from eeengine.serve.app import ServeConfig, ServedModel, create_app, run
from eeengine.serve.batcher import StaticBatcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-requests", type=int)
    parser.add_argument("--max-concurrent-requests", type=int, default=512)
    parser.add_argument("--max-client-batch-size", type=int, default=32)
    parser.add_argument("--max-input-length", type=int)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    engine = Engine(args.ckpt, max_length=args.max_input_length, executor="torch")
    model = FullDepth(engine)
    depth = engine.num_layers

    @torch.inference_mode()
    def run_batch(input_ids, attention_mask, token_type_ids):
        logits = model(input_ids, attention_mask, token_type_ids).float()
        return logits, torch.full((input_ids.shape[0],), depth)

    served = ServedModel(
        engine.tokenizer,
        engine.label_names,
        depth,
        engine.max_length,
        info={"model_id": args.ckpt, "runtime": "transformers BertModel, full depth"},
    )
    config = ServeConfig(
        max_concurrent_requests=args.max_concurrent_requests,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_requests=args.max_batch_requests,
        max_client_batch_size=args.max_client_batch_size,
        batching="static",
    )
    app = create_app(
        served, config, lambda **limits: StaticBatcher(run_batch, device=engine.device, **limits)
    )
    run(app, args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
