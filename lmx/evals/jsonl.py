"""JSON Lines reading shared by the problem loaders, the samples reader and the results reader:
one place that turns a bad line into an error naming the file and the line number."""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator


def iter_json_objects(lines: Iterable[str], source: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of ``lines`` (1-based numbers).

    Raises:
      ValueError: a line is not valid JSON or not a JSON object; the message is
        ``"<source>:<line>: ..."``.
    """
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{source}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec
