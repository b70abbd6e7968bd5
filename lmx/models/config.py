"""Model configuration for the decoder-only transformers (Llama family and GPT-2)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

Arch = Literal["llama", "gpt2"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``arch="llama"``: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.
    ``arch="gpt2"``: learned absolute positions, LayerNorm with bias, tanh-GELU MLP, biases.

    Numerics: parameters are stored in ``param_dtype``; matmuls run in ``compute_dtype`` (``None``
    = bf16 on GPU/TPU, f32 on CPU, where XLA's bf16 matmuls measured no faster than f32); norms,
    softmax and logits are f32.
    ``scan_unroll``: layers are a ``lax.scan`` over stacked ``[L, ...]`` weights; ``None`` unrolls
    fully on CPU (measured +9-14 % train step) and keeps the rolled loop elsewhere.
    ``remat``: ``"none"``, ``"dots"`` (save matmul outputs) or ``"full"``.
    ``attn_q_block``: query block of the explicit causal attention (key blocks above the diagonal
    are skipped); ``None`` = 64 on CPU (measured 4-5 % faster train step at 4x256, SmolLM2-135M
    shapes) and the whole sequence elsewhere.
    ``attn_impl``: ``"explicit"`` (einsum + f32 softmax; works everywhere, any mask) or ``"cudnn"``
    (flash attention on NVIDIA GPUs; bf16 compute; used only when there is no padding mask).
    """

    arch: Arch = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 128
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    param_dtype: str = "float32"
    compute_dtype: str | None = None
    scan_unroll: int | bool | None = None
    remat: Literal["none", "dots", "full"] = "none"
    attn_q_block: int | None = None
    attn_impl: Literal["explicit", "cudnn"] = "explicit"
    init_std: float = 0.02

    def __post_init__(self):
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"arch must be 'llama' or 'gpt2', got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.arch == "gpt2" and self.n_kv_heads != self.n_heads:
            raise ValueError("gpt2 uses full multi-head attention: n_kv_heads must equal n_heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) "
                             "unless head_dim is given")
        if self.arch == "llama" and self.hd % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.hd}")
        if self.remat not in ("none", "dots", "full"):
            raise ValueError(f"remat must be 'none', 'dots' or 'full', got {self.remat!r}")
        if self.attn_q_block is not None and (not isinstance(self.attn_q_block, int)
                                              or self.attn_q_block <= 0):
            raise ValueError(f"attn_q_block must be a positive int or None, got {self.attn_q_block!r}")
        if self.attn_impl not in ("explicit", "cudnn"):
            raise ValueError(f"attn_impl must be 'explicit' or 'cudnn', got {self.attn_impl!r}")
        jnp.dtype(self.param_dtype)
        if self.compute_dtype is not None:
            jnp.dtype(self.compute_dtype)

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.hd

    @property
    def gated_mlp(self) -> bool:
        return self.arch == "llama"

    def dtype_of_compute(self) -> jnp.dtype:
        if self.compute_dtype is not None:
            return jnp.dtype(self.compute_dtype)
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)

    def unroll(self) -> int | bool:
        if self.scan_unroll is not None:
            return self.scan_unroll
        return True if jax.default_backend() == "cpu" else 1

    def q_block(self, n_queries: int) -> int:
        if self.attn_q_block is not None:
            return self.attn_q_block
        return 64 if jax.default_backend() == "cpu" else n_queries

    def matmul_params(self) -> int:
        """Parameters that enter matmuls per token (lm_head counted once even when tied)."""
        per_layer = self.d_model * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.d_model
        per_layer += self.d_model * self.d_ff * (3 if self.gated_mlp else 2)
        return self.n_layers * per_layer + self.d_model * self.vocab_size

    def train_flops_per_token(self, seq_len: int, causal_half: bool = True) -> float:
        """Model FLOPs per trained token: 6*N_mm + attention (12*L*T*H*hd, halved if causal)."""
        attn = 12 * self.n_layers * seq_len * self.q_dim
        return 6 * self.matmul_params() + (attn / 2 if causal_half else attn)

    # Presets ------------------------------------------------------------------------------
    @classmethod
    def tiny_llama(cls, **kw: Any) -> "ModelConfig":
        base = dict(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=128, max_seq_len=256, rope_theta=10000.0, tie_embeddings=False)
        return cls(**{**base, **kw})

    @classmethod
    def tiny_gpt2(cls, **kw: Any) -> "ModelConfig":
        base = dict(arch="gpt2", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                    d_ff=256, max_seq_len=256, tie_embeddings=True)
        return cls(**{**base, **kw})

    @classmethod
    def smollm2_135m(cls, **kw: Any) -> "ModelConfig":
        base = dict(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    d_ff=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5,
                    tie_embeddings=True)
        return cls(**{**base, **kw})

    @classmethod
    def llama_1b(cls, **kw: Any) -> "ModelConfig":
        """Llama-3.2-1B shapes (the MFU benchmark's model)."""
        base = dict(arch="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                    n_kv_heads=8, d_ff=8192, max_seq_len=8192, rope_theta=500000.0,
                    tie_embeddings=True)
        return cls(**{**base, **kw})

    @classmethod
    def gpt2_small(cls, **kw: Any) -> "ModelConfig":
        base = dict(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                    d_ff=3072, max_seq_len=1024, tie_embeddings=True)
        return cls(**{**base, **kw})
