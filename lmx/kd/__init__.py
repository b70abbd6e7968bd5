"""Knowledge distillation for causal LMs: divergences, ATKD and a fused chunked path.

Paper: ATKD, Zhong et al. 2024, arXiv:2402.11890; docs: ``docs/kd.md``.
"""
from lmx.kd.atkd import (ATKDConfig, atkd_loss, atkd_threshold, target_decomposition)
from lmx.kd.divergences import KINDS, KDConfig, kd_loss, token_divergence
from lmx.kd.fused import auto_chunk_tokens, fused_linear_kd_loss

__all__ = ["ATKDConfig", "KDConfig", "KINDS", "atkd_loss", "atkd_threshold", "auto_chunk_tokens",
           "fused_linear_kd_loss", "kd_loss", "target_decomposition", "token_divergence"]
