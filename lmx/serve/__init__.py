"""OpenAI-compatible chat-completions server for lmx models: ``python -m lmx.serve --model NAME``."""
from lmx.serve.app import ChatServer, RequestError, parse_chat_request

__all__ = ["ChatServer", "RequestError", "parse_chat_request"]
