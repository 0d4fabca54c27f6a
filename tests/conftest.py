"""Shared fixtures: tiny models built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# A micro `phiforge run`: every stage, a few steps, a handful of eval items (tests/test_run.py, test_ablation.py).
MICRO_RUN = {
    "corpus": {"max_files": 12, "max_chars": 6000},
    "curate": {"steps": [
        {"type": "python"},
        {"type": "exact_dedup"},
        {"type": "minhash", "ngram": 5, "bands": 14, "rows": 8, "threshold": 0.7},
        {"type": "decontaminate", "ngram": 13, "benchmarks": ["humaneval"]},
    ]},
    "synth": {"n": 40},
    "textbooks": {"n": 0},
    "tokenizer": {"vocab_size": 512, "val_fraction": 0.2},
    "train": {"max_steps": 4, "seq_len": 64, "micro_batch": 4, "warmup": 1, "eval_every": 2, "eval_batches": 2,
              "save_every": 4},
    "finetune": {"max_steps": 3, "seq_len": 64, "micro_batch": 4, "warmup": 1, "eval_every": 3, "eval_batches": 2,
                 "save_every": 3},
    "eval": {"heldout_exercises": 3, "humaneval_limit": 2, "max_new_tokens": 16, "samples": ["def add(a, b):\n"],
             "mbpp_limit": 2, "bpb_stdlib_files": 2},
}


def tiny_config(**overrides):
    from phiforge.config import ModelConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                partial_rotary_factor=0.5, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    base.update(overrides)
    return ModelConfig(**base)


class JSONServer:
    """A threaded HTTP server on 127.0.0.1 for fake OpenAI-compatible endpoints: every POST's JSON body goes to
    `self.handle(h, body)` (h: the request handler, to answer with); a client hanging up mid-answer is ignored.
    Subclasses call `self.start()` at the end of `__init__`; `url` ends in /v1."""

    def start(self) -> None:
        import contextlib
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    owner.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handle(self, h, body: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tiny_checkpoint(path, texts, tokenizer_vocab: int, context: int):
    """A tiny random Phi (noisy weights, so it says varied things) with a BPE trained on `texts`, saved at `path`."""
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(texts, tokenizer_vocab)
    torch.manual_seed(0)
    model = Phi(tiny_config(vocab_size=320, max_position_embeddings=context))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(model, path, tokenizer=tok)
    return path


@pytest.fixture
def tiny_model():
    import torch

    from phiforge.model import Phi

    torch.manual_seed(0)
    model = Phi(tiny_config())
    # Random (not default-initialised) LayerNorm and bias values, so a parity test exercises every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
