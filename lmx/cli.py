"""Logging set-up shared by the command-line entry points (``python -m benchmarks``,
``python -m lmx.serve``, ``python -m lmx.merge.runner``): one format, level from
``LMX_LOG_LEVEL`` (default INFO), JAX's backend-probe chatter kept at WARNING."""
from __future__ import annotations

import logging
import os


def configure_logging(level: str | int | None = None) -> None:
    """``logging.basicConfig`` for a CLI process; ``level`` overrides ``LMX_LOG_LEVEL``."""
    logging.basicConfig(level=level or os.environ.get("LMX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
