"""OpenAI-compatible serving of lmx models: ``python -m lmx.serve --model NAME``.

:mod:`lmx.serve.engine` is the continuous-batching engine (KV-cache slots, no recompiles after
warm-up, per-request PRNG streams, cancellation); :mod:`lmx.serve.app` the FastAPI/uvicorn server.
"""
from lmx.serve.app import ChatServer, RequestError, create_app, normalize_messages
from lmx.serve.engine import Engine, Event, FunctionEngine, GenRequest, Stream, backend_compiles

__all__ = ["ChatServer", "Engine", "Event", "FunctionEngine", "GenRequest", "RequestError",
           "Stream",
           "backend_compiles", "create_app", "normalize_messages"]
