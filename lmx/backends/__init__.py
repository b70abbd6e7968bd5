"""Chat backends behind one small interface (see :mod:`lmx.backends.base`).

* :class:`LocalBackend`: a local lmx model (chat template, continuous-batching engine of
  :mod:`lmx.serve.engine`).
* :class:`OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` server.
* :mod:`lmx.backends.testing`: scripted backends and a byte-level ChatML tokenizer for tests.

``python -m lmx.serve`` exposes a :class:`LocalBackend` over HTTP.
"""
from lmx.backends.base import (
                               BackendError,
                               ChatBackend,
                               Completion,
                               CompletionBackend,
                               LabelProbBackend,
                               SamplingParams,
                               has_images,
                               restricted_softmax,
                               validate_conversations,
)
from lmx.backends.local import LocalBackend, PromptTooLongError
from lmx.backends.openai_client import OpenAIBackend

__all__ = ["BackendError", "ChatBackend", "Completion", "CompletionBackend", "LabelProbBackend",
           "LocalBackend", "OpenAIBackend", "PromptTooLongError", "SamplingParams", "has_images",
           "restricted_softmax", "validate_conversations"]
