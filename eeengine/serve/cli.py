"""``eeengine serve``: the command line of the HTTP server (TEI's option names)."""

from __future__ import annotations

import argparse

from eeengine.cli_args import add_model_args, add_policy_args, engine_settings
from eeengine.engine import Engine
from eeengine.serve import BATCHING, SCHEDULES


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eeengine serve`` on the ``eeengine`` command's subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP (text-embeddings-inference's /predict)",
        description="POST /predict (text-embeddings-inference's request and response, plus "
        "each input's exit layer), GET /health, /info, /metrics (Prometheus), /docs. "
        "Needs the serve extra: pip install 'eeengine[serve]'.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--batching",
        choices=BATCHING,
        default="continuous",
        help="continuous: layer-wise continuous batching (one queue per depth); static: a "
        "batch runs to completion before the next starts, as in text-embeddings-inference",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="fullest",
        help="continuous batching: which depth runs next; fullest: the queue with the most "
        "inputs (but see --max-wait-ms); oldest: the queue holding the longest-waiting input",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=25.0,
        help="with --schedule fullest: once an input has waited this long (ms since arrival), "
        "the queue holding the longest-waiting input runs next; 0 disables the rule",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=512,
        help="requests in flight; one more is answered 429 at once",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="padded tokens per model call (inputs x longest input)",
    )
    p.add_argument(
        "--max-batch-requests", type=int, help="inputs per model call (default: no limit)"
    )
    p.add_argument(
        "--max-client-batch-size", type=int, default=32, help="inputs per request; more get 413"
    )
    p.add_argument(
        "--max-input-length",
        type=int,
        help="tokens per input (default: the checkpoint's max_seq_length); longer inputs are "
        'refused (413) unless the request says "truncate": true',
    )
    p.add_argument("--log-level", default="info", help="uvicorn's log level")
    add_policy_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from eeengine.serve.app import ServeConfig, engine_app, run
    except ImportError as error:
        raise RuntimeError(
            f"eeengine serve needs the serve extra: pip install 'eeengine[serve]' ({error})"
        ) from None
    engine = Engine(**engine_settings(args), max_length=args.max_input_length)
    config = ServeConfig(
        max_concurrent_requests=args.max_concurrent_requests,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_requests=args.max_batch_requests,
        max_client_batch_size=args.max_client_batch_size,
        batching=args.batching,
        schedule=args.schedule,
        max_wait_ms=args.max_wait_ms or None,
    )
    run(engine_app(engine, config), args.host, args.port, args.log_level)
