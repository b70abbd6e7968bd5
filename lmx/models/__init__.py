"""Decoder-only LMs (Llama family, GPT-2): modules, offline loading/saving, decoding, scoring."""
from lmx.models.config import ModelConfig
from lmx.models.fused_ce import (default_chunk_size, from_time_chunks, fused_next_token_nll,
                                 to_time_chunks)
from lmx.models.generate import generate, sample_logits
from lmx.models.loading import (REGISTRY, config_from_hf, config_to_hf, hf_state_dict, load, load_gguf,
                                load_hf, model_from_arrays, save_hf, smollm2_gguf_path, with_config)
from lmx.models.scoring import (mean_token_nll, next_token_logprobs, token_logprobs,
                                token_logprobs_with_next)
from lmx.models.transformer import Transformer, check_tokens, param_count, positions_from_mask

__all__ = ["ModelConfig", "Transformer", "generate", "sample_logits", "load", "load_gguf", "load_hf",
           "save_hf", "hf_state_dict", "model_from_arrays", "config_from_hf", "config_to_hf",
           "smollm2_gguf_path", "with_config", "REGISTRY", "token_logprobs", "next_token_logprobs", "mean_token_nll",
           "token_logprobs_with_next", "fused_next_token_nll", "default_chunk_size",
           "to_time_chunks", "from_time_chunks",
           "check_tokens", "param_count", "positions_from_mask"]
