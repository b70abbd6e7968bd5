"""Fixtures for the data-layer tests: a byte-level ChatML tokenizer built offline and a private
``datasets`` cache under tmp_path (so no test reads another's cache or the user's)."""
import pytest


@pytest.fixture(scope="session")
def tok():
    from lmx.backends.testing import byte_chat_tokenizer

    return byte_chat_tokenizer()


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")
