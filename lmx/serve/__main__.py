"""``python -m lmx.serve --model smollm2-135m-instruct --port 8000``.

``--model`` is anything ``lmx.models.load`` accepts (a registered name, an HF checkpoint
directory, a .gguf file) or ``tiny-random`` (a 2-layer random Llama with a byte-level ChatML
tokenizer, for smoke tests). The server binds 127.0.0.1 unless ``--host`` says otherwise, and
compiles every engine shape before it opens the port (``--no-warmup`` to skip).
"""
from __future__ import annotations

import argparse
import logging
import sys

from lmx.cli import configure_logging


def build_backend(model: str, *, max_batch: int, max_seq_len: int | None, seed: int = 0):
    """A LocalBackend with a continuous-batching engine of ``max_batch`` slots."""
    from lmx.backends import LocalBackend

    if model == "tiny-random":
        from flax import nnx

        from lmx.backends.testing import byte_chat_tokenizer
        from lmx.models import ModelConfig, Transformer

        tok = byte_chat_tokenizer()
        cfg = ModelConfig.tiny_llama(vocab_size=len(tok), max_seq_len=max_seq_len or 256)
        return LocalBackend.from_lmx(Transformer(cfg, rngs=nnx.Rngs(seed)), tok,
                                     model_name=model, max_batch=max_batch)
    return LocalBackend.load(model, max_batch=max_batch, max_seq_len=max_seq_len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmx.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-name", default=None, help="model id clients send (default: --model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16,
                    help="KV-cache slots (concurrent requests)")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--default-max-tokens", type=int, default=256)
    ap.add_argument("--no-warmup", action="store_true", help="compile shapes on first use instead")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    configure_logging("DEBUG" if args.verbose else None)
    from lmx.serve.app import ChatServer

    backend = build_backend(args.model, max_batch=args.max_batch, max_seq_len=args.max_seq_len)
    server = ChatServer(backend, model_name=args.served_name or args.model, host=args.host,
                        port=args.port, default_max_tokens=args.default_max_tokens,
                        warmup=not args.no_warmup, verbose=args.verbose)
    logging.getLogger("lmx.serve").info("%r on %s (warming up)", server.model_name, server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
