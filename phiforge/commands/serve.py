"""Serve a model over an OpenAI-compatible HTTP API: /v1/models, /v1/completions (logprobs, echo),
/v1/chat/completions, streaming (server-sent events). Concurrent requests are batched together on one model
worker. Any OpenAI client works:

  phiforge serve --model runs/phi-100m/final --quant int8 --port 8000
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); \\
             print(c.completions.create(model='final', prompt='def f(x):', max_tokens=32).choices[0].text)"
"""

from __future__ import annotations

import argparse

from phiforge.commands.chat import add_load_arguments, load_engine_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory with config, weights and tokenizer "
                                                       "(or phiforge:DIR, or a hub id)")
    parser.add_argument("--name", default=None, help="model id clients ask for (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    add_load_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=64, help="most requests decoded together in one batch")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the worker waits for more requests before starting a batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (helps on GPU)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from phiforge.errors import ConfigError
    from phiforge.serve.server import Server

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    engine = load_engine_from(args, compile=args.compile)
    name = args.name or Path(args.model).resolve().name
    server = Server(engine, name, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level="info")
    finally:
        server.batcher.close()
    return 0
