"""Serve a model over an OpenAI-compatible HTTP API: /v1/models, /v1/completions (logprobs, echo),
/v1/chat/completions, streaming (server-sent events), and a chat page at /. Concurrent requests are batched
together on one model worker. Any OpenAI client works:

  phiforge serve --model runs/phi-100m/final --quant int8 --port 8000
  phiforge serve --model smollm2            # any Hugging Face causal LM runs through transformers
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); \\
             print(c.completions.create(model='final', prompt='def f(x):', max_tokens=32).choices[0].text)"

With --api-key (or PHIFORGE_API_KEY) every /v1 route needs `Authorization: Bearer <key>`; the chat page asks
for it. Without a key anyone who can reach the port can use the model: listening beyond this machine
(--host 0.0.0.0) without one prints a warning.
"""

from __future__ import annotations

import argparse

from phiforge.commands.chat import MODEL_HELP, add_load_arguments, load_engine_from

API_KEY_ENV = "PHIFORGE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--name", default=None, help="model id clients ask for (default: the model's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on every API route (default: ${API_KEY_ENV})")
    add_load_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=64, help="most requests decoded together in one batch")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the worker waits for more requests before starting a batch")
    parser.add_argument("--max-body-mb", type=float, default=4.0,
                        help="largest request body accepted, in MiB (larger ones get 413)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (helps on GPU)")


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def model_name(spec: str) -> str:
    """The default model id: the checkpoint directory's or file's name, or the alias itself."""
    from pathlib import Path

    text = spec.partition(":")[2] if spec.startswith(("hf:", "phiforge:")) else spec
    p = Path(text)
    if p.exists():
        p = p.resolve()
        return p.stem if p.suffix == ".gguf" else p.name
    return text


def decode_line(engine) -> str:
    """What the engine's decode steps run on, in one line (phiforge.decode.Decoder.describe): nothing falls back
    to a slower path without saying so."""
    describe = getattr(engine.decoder, "describe", None)
    if engine.compiled:
        return "decode: torch.compile of the model's modules (--compile)"
    return describe() if describe is not None else f"decode: {engine.backend} backend (the model's own forward)"


def main(args: argparse.Namespace) -> int:
    import os
    import sys

    import uvicorn

    from phiforge.errors import ConfigError
    from phiforge.serve.server import Server, bind_socket

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not args.max_body_mb > 0:
        raise ConfigError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if key is not None and not key.strip():
        raise ConfigError("--api-key is empty; give a key or leave the flag out")
    # the port first: a busy one fails now, not after loading the model
    sock = bind_socket(args.host, args.port)
    try:
        engine = load_engine_from(args, compile=args.compile)
        name = args.name or model_name(args.model)
        server = Server(engine, name, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                        api_key=key, max_body_bytes=int(args.max_body_mb * (1 << 20)))
        if key is None and not is_loopback(args.host):
            print(f"phiforge: warning: listening on {args.host} without an API key: anyone who can reach this port "
                  f"can use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
        host = f"[{args.host}]" if ":" in args.host else args.host
        port = sock.getsockname()[1]
        print(f"serving {name!r} ({engine.backend} backend) at http://{host}:{port}/v1, chat page at "
              f"http://{host}:{port}/" + (" (API key required)" if key else ""), flush=True)
        print(decode_line(engine), flush=True)
        try:
            config = uvicorn.Config(server.app, log_level="info", timeout_keep_alive=30, backlog=2048)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            server.close()
    finally:
        sock.close()
    return 0
