"""GraphTrans (arXiv:2201.08821), Graphormer (arXiv:2106.05234) and GraphGPS (arXiv:2205.12454) in
Flax NNX with GTSP gates (Liu et al. 2023, arXiv:2312.05479).

All three share one call signature::

    preds = model(batch, gates=None, *, mode="clean", train=False, rng=None, probes=None)

``batch`` is a :class:`graphs.data.GraphBatch`; ``preds`` float32 ``[B, n_out]`` (padding graphs
included; mask them with ``batch.graph_mask``). ``gates`` is a :class:`Gates` pytree (masks are
call arguments, not parameters, so ``jax.grad`` w.r.t. a gate is its Taylor importance and new
mask values never recompile). ``gates=None`` runs the unpruned model.

Deviations (documented in docs/graphs.md): LayerNorm replaces BatchNorm everywhere (padding- and
batch-composition-invariant, no running statistics in a pure train step); GraphGPS uses GINE as
its local MPNN (the official GTSP code's choice; GatedGCN is not implemented).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from flax import nnx

from graphs.data import BatchSpec, GraphBatch, batch_graphs
from graphs.layers import (FFN, GINE, MHA, CategoricalEncoder, _rng, dropout, gather_tokens,
                           scatter_tokens, select_tokens, to_dense, to_flat)

BACKBONES = ("graphtrans", "graphormer", "gps")


class Gates(NamedTuple):
    """GTSP masks (all float32; 1 = keep). Shapes use the config's max heads H / FFN width F.

    token_keep ``[L]`` keep ratio per layer; head ``[L, H]``; layer ``[L]``; drop_path scalar
    (faithful: node-wise drop-path prob on the attention branch; clean: per-graph layer-drop prob);
    ffn_units ``[L, F]`` structured weight mask on FFN hidden units.
    """

    token_keep: jax.Array
    head: jax.Array
    layer: jax.Array
    drop_path: jax.Array
    ffn_units: jax.Array


@dataclasses.dataclass(frozen=True)
class GTConfig:
    """Backbone hyper-parameters. ``heads``/``head_ids`` (per layer: kept head count and original
    head ids, which select Graphormer's per-head bias), ``ffn`` (per-layer width) and
    ``token_gather`` (per-layer static keep ratio, physical gather at inference) are set by
    clean-mode export."""

    backbone: str
    n_out: int
    node_vocab: tuple | None = None
    node_dim: int = 0
    edge_vocab: tuple | None = None
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 128
    heads: tuple | None = None
    head_ids: tuple | None = None
    ffn: tuple | None = None
    token_gather: tuple | None = None
    gnn_layers: int = 2
    pe: str = "rwse"
    pe_dim: int = 16
    pe_width: int = 16
    max_degree: int = 64
    max_spd: int = 32
    max_hops: int = 5
    dropout: float = 0.1
    attention: str = "dense"
    readout: str = "mean"

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.node_vocab is None and self.node_dim <= 0:
            raise ValueError("give node_vocab (categorical nodes) or node_dim > 0 (float nodes)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if self.attention not in ("dense", "segment"):
            raise ValueError(f"attention must be dense/segment, got {self.attention!r}")
        if self.attention == "segment" and self.backbone != "gps":
            raise ValueError("segment attention is implemented for the GPS backbone only "
                             "(GraphTrans' CLS token and Graphormer's pair bias need dense tokens)")
        if self.pe not in ("none", "rwse", "lap"):
            raise ValueError(f"pe must be none/rwse/lap, got {self.pe!r}")
        for name in ("heads", "head_ids", "ffn", "token_gather"):
            v = getattr(self, name)
            if v is not None and len(v) != self.n_layers:
                raise ValueError(f"{name} must have n_layers={self.n_layers} entries, got {v}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_heads(self, i: int) -> int:
        return self.n_heads if self.heads is None else self.heads[i]

    def layer_ffn(self, i: int) -> int:
        return self.d_ff if self.ffn is None else self.ffn[i]

    @property
    def n_special(self) -> int:
        """Tokens added to each graph's attention sequence (CLS / VNode)."""
        return 0 if self.backbone == "gps" else 1

    def batch_spec(self) -> BatchSpec:
        return BatchSpec(spd=self.backbone == "graphormer", max_hops=self.max_hops,
                         pe=self.pe if self.backbone == "gps" else "none", pe_dim=self.pe_dim,
                         fc_pairs=self.attention == "segment")


def full_gates(cfg: GTConfig) -> Gates:
    """All-ones gates (no pruning) with the config's shapes."""
    L, H, F = cfg.n_layers, cfg.n_heads, cfg.d_ff
    return Gates(jnp.ones((L,)), jnp.ones((L, H)), jnp.ones((L,)), jnp.zeros(()), jnp.ones((L, F)))


def _node_encoder(cfg: GTConfig, d: int, rngs: nnx.Rngs):
    if cfg.node_vocab is not None:
        return CategoricalEncoder(cfg.node_vocab, d, rngs=rngs)
    return nnx.Linear(cfg.node_dim, d, rngs=rngs)


def _encode_nodes(enc, nodes):
    if isinstance(enc, CategoricalEncoder):
        return enc(nodes)
    return enc(nodes.astype(jnp.float32))


class _AttnBlock(nnx.Module):
    """One attention sub-layer with its GTSP token scorer."""

    def __init__(self, d: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.attn = MHA(d, heads, head_dim, rngs=rngs)
        self.scorer = nnx.Linear(d, 1, rngs=rngs)

    def __call__(self, x, valid, *, always, bias, gates, li, mode, train, rng, probe, gather):
        """x ``[B, T, d]``, valid/always bool ``[B, T]``, bias ``[B, H, T, T]`` or None."""
        hg = hk = None
        if gates is not None:
            h = gates.head[li, :self.attn.n_heads]
            hg, hk = (h, None) if mode == "clean" else (None, h)
        if gather is not None:
            # clean-mode inference with physical token removal: only K tokens enter attention
            B, T, _ = x.shape
            n_alw = 0 if always is None else 1     # at most one CLS/VNode token per graph
            K = min(T, math.ceil(gather * (T - n_alw) - 1e-6) + n_alw)
            scores = self.scorer(x)[..., 0]
            _, hard, order = select_tokens(scores, valid, jnp.float32(gather), mode="clean",
                                           train=False, rng=None, always=always)
            xg, idx = gather_tokens(x, order, K)
            kg = jnp.take_along_axis(hard, idx, axis=1)
            bg = None
            if bias is not None:
                bg = jnp.take_along_axis(bias, idx[:, None, :, None], axis=2)
                bg = jnp.take_along_axis(bg, idx[:, None, None, :], axis=3)
            y = self.attn(xg, kg, bias=bg, head_gate=hg) * kg[..., None].astype(x.dtype)
            return scatter_tokens(y, idx, T)
        if gates is None:
            return self.attn(x, valid, bias=bias, probe=probe)
        scores = self.scorer(x)[..., 0]
        mask, hard, _ = select_tokens(scores, valid, gates.token_keep[li], mode=mode, train=train,
                                      rng=_rng(rng, 7), always=always)
        m = mask[..., None].astype(x.dtype)
        if mode == "faithful":
            # official GTSP code: dropped tokens are zeroed but still act as queries/keys/values
            return self.attn(x * m, valid, bias=bias, head_kernel_mask=hk, probe=probe)
        return self.attn(x, valid & hard, bias=bias, head_gate=hg, probe=probe) * m


def _branch_gate(gates, li, mode, train, rng, shape):
    """Faithful: node-wise drop-path multiplier on the attention branch (``[B, T]``, scaled by
    1/(1-p), identity at eval). Clean: no branch multiplier."""
    if gates is None or mode != "faithful" or not train:
        return None
    p = gates.drop_path
    keep = jax.random.bernoulli(rng, 1.0 - p, shape)
    return jnp.where(keep, 1.0 / (1.0 - p), 0.0)


def _layer_gate(gates, li, mode, train, rng, n_graph):
    """Clean: whole-layer gate per graph ``[B]`` = g_l x Bernoulli(1-p) (layer drop in training)."""
    if gates is None or mode != "clean":
        return None
    g = jnp.broadcast_to(gates.layer[li], (n_graph,))
    if train:
        g = g * jax.random.bernoulli(rng, 1.0 - gates.drop_path, (n_graph,)).astype(g.dtype)
    return g


def _mix(g, new, old):
    # g * new + (1 - g) * old: exactly `new` at g = 1 and exactly `old` at g = 0
    return g * new + (1.0 - g) * old


class _TransformerLayer(nnx.Module):
    def __init__(self, d, heads, head_dim, f, *, act, rngs):
        self.block = _AttnBlock(d, heads, head_dim, rngs=rngs)
        self.ffn = FFN(d, f, act=act, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)


class _GPSLayer(nnx.Module):
    def __init__(self, d, heads, head_dim, f, *, rngs):
        self.block = _AttnBlock(d, heads, head_dim, rngs=rngs)
        self.mpnn = GINE(d, rngs=rngs)
        self.ffn = FFN(d, f, rngs=rngs)
        self.ln_m = nnx.LayerNorm(d, rngs=rngs)
        self.ln_a = nnx.LayerNorm(d, rngs=rngs)
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)


class GraphModel(nnx.Module):
    """GraphTrans / Graphormer / GraphGPS selected by ``cfg.backbone``.

    * GraphTrans (Wu et al. 2021, arXiv:2201.08821; github.com/ucbrise/graphtrans): GIN encoder
      (``gnn_layers``) -> Linear -> post-norm Transformer over nodes + trailing learned CLS token
      (no PE) -> final LayerNorm -> CLS -> head.
    * Graphormer (Ying et al. 2021, arXiv:2106.05234; github.com/microsoft/Graphormer): [VNode] +
      nodes, node embedding + degree (centrality) embedding, per-head bias = spatial b(SPD) +
      multi-hop edge encoding (mean over the first min(SPD, max_hops) path edges of
      <edge-emb_n, w_n>), learned VNode<->node scalar per head; pre-LN layers, final LN, VNode
      readout.
    * GraphGPS (Rampasek et al. 2022, arXiv:2205.12454; github.com/rampasek/GraphGPS): atom
      embedding (d - pe_width) ++ Linear(PE) (RWSE or LapPE with random sign flips in training);
      per layer h_M = LN(h + GINE(h)), h_A = LN(h + MHA(h)), h = LN((h_M + h_A) + FFN(h_M + h_A));
      mean/sum readout.
    All use a 2-layer MLP head (d -> d/2 -> n_out).
    """

    def __init__(self, cfg: GTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        if cfg.backbone == "gps":
            width = d - cfg.pe_width if cfg.pe != "none" else d
            self.node_enc = _node_encoder(cfg, width, rngs)
            self.pe_lin = nnx.Linear(cfg.pe_dim, cfg.pe_width, rngs=rngs) if cfg.pe != "none" else None
            self.edge_enc = CategoricalEncoder(cfg.edge_vocab, d, rngs=rngs) if cfg.edge_vocab else None
            self.layers = nnx.List([_GPSLayer(d, cfg.layer_heads(i), cfg.head_dim, cfg.layer_ffn(i),
                                              rngs=rngs) for i in range(cfg.n_layers)])
        elif cfg.backbone == "graphtrans":
            self.node_enc = _node_encoder(cfg, d, rngs)
            self.edge_enc = CategoricalEncoder(cfg.edge_vocab, d, rngs=rngs) if cfg.edge_vocab else None
            self.gnn = nnx.List([GINE(d, rngs=rngs) for _ in range(cfg.gnn_layers)])
            self.gnn_ln = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(cfg.gnn_layers)])
            self.proj = nnx.Linear(d, d, rngs=rngs)
            self.cls = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d,)))
            self.layers = nnx.List([_TransformerLayer(d, cfg.layer_heads(i), cfg.head_dim,
                                                      cfg.layer_ffn(i), act="relu", rngs=rngs)
                                    for i in range(cfg.n_layers)])
            self.final_ln = nnx.LayerNorm(d, rngs=rngs)
        else:
            self.node_enc = _node_encoder(cfg, d, rngs)
            self.deg_emb = nnx.Embed(cfg.max_degree + 1, d, rngs=rngs,
                                     embedding_init=nnx.initializers.normal(0.02))
            self.vnode = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d,)))
            self.spatial = nnx.Embed(cfg.max_spd, cfg.n_heads, rngs=rngs,
                                     embedding_init=nnx.initializers.normal(0.02))
            self.vnode_bias = nnx.Param(jnp.zeros((cfg.n_heads,)))
            if cfg.edge_vocab:
                self.edge_enc = CategoricalEncoder(cfg.edge_vocab, cfg.n_heads, rngs=rngs)
                self.hop_w = nnx.Param(nnx.initializers.normal(0.02)(
                    rngs.params(), (cfg.max_hops, cfg.n_heads, cfg.n_heads)))
            else:
                self.edge_enc = None
            self.layers = nnx.List([_TransformerLayer(d, cfg.layer_heads(i), cfg.head_dim,
                                                      cfg.layer_ffn(i), act="gelu", rngs=rngs)
                                    for i in range(cfg.n_layers)])
            self.final_ln = nnx.LayerNorm(d, rngs=rngs)
        self.head1 = nnx.Linear(d, max(d // 2, 1), rngs=rngs)
        self.head2 = nnx.Linear(max(d // 2, 1), cfg.n_out, rngs=rngs)

    # -- helpers --------------------------------------------------------------------------------
    def tokens_per_graph(self, batch: GraphBatch) -> int:
        """Length T of each graph's attention sequence (dense width M plus CLS/VNode)."""
        return batch.dense_index.shape[-1] + self.cfg.n_special

    def _gather_ratio(self, li):
        tg = self.cfg.token_gather
        return None if tg is None or tg[li] is None or tg[li] >= 1.0 else float(tg[li])

    def _head(self, z):
        return self.head2(jax.nn.relu(self.head1(z))).astype(jnp.float32)

    def _check(self, batch, gates, mode, probes):
        if not isinstance(batch, GraphBatch):
            raise TypeError(f"batch: expected a graphs.data.GraphBatch, got "
                            f"{type(batch).__name__}; build one with "
                            f"graphs.data.make_batches(ds, idx, batch_size, "
                            f"spec=model.cfg.batch_spec()) or, for a few graphs, "
                            f"graphs.data.batch_graphs(graphs, model.cfg.batch_spec())")
        cfg, nodes, edges = self.cfg, batch.graph.nodes, batch.graph.edges
        width = len(cfg.node_vocab) if cfg.node_vocab is not None else cfg.node_dim
        what = "node_vocab entries" if cfg.node_vocab is not None else "node_dim"
        if nodes.ndim != 2 or nodes.shape[1] != width:
            raise ValueError(f"batch.graph.nodes: the graphs' node features have shape "
                             f"{tuple(nodes.shape)} ([nodes, width]); this model expects width "
                             f"{width} (GTConfig {what})")
        if cfg.edge_vocab:
            if edges is None or edges.ndim != 2 or edges.shape[1] != len(cfg.edge_vocab):
                raise ValueError(f"batch.graph.edges: the graphs' edge features have shape "
                                 f"{None if edges is None else tuple(edges.shape)}; this model "
                                 f"expects [edges, {len(cfg.edge_vocab)}] (GTConfig edge_vocab "
                                 f"{cfg.edge_vocab})")
        if mode not in ("faithful", "clean"):
            raise ValueError(f"mode must be 'faithful' or 'clean', got {mode!r}")
        if gates is not None and self.cfg.heads is not None:
            raise ValueError("an exported (physically pruned) model runs without gates")
        if gates is not None:
            L, H, F = self.cfg.n_layers, self.cfg.n_heads, self.cfg.d_ff
            want = {"token_keep": (L,), "head": (L, H), "layer": (L,), "drop_path": (),
                    "ffn_units": (L, F)}
            for k, shp in want.items():
                if tuple(getattr(gates, k).shape) != shp:
                    raise ValueError(f"gates.{k} must have shape {shp}, got "
                                     f"{tuple(getattr(gates, k).shape)}")
        if probes is not None and (mode != "faithful" or self.cfg.attention != "dense"):
            raise ValueError("head probes implement the official GTSP code's faithful importance "
                             "(dense attention)")
        spec = self.cfg.batch_spec()
        if spec.spd and batch.spd is None:
            raise ValueError("Graphormer needs batch.spd/path_edges: build batches with "
                             "cfg.batch_spec()")
        if spec.pe != "none" and batch.pe is None:
            raise ValueError(f"GPS with pe={spec.pe!r} needs batch.pe: use cfg.batch_spec()")
        if spec.fc_pairs and batch.fc_senders is None:
            raise ValueError("segment attention needs batch.fc_senders: use cfg.batch_spec()")

    def __call__(self, batch: GraphBatch | jraph.GraphsTuple, gates: Gates | None = None, *,
                 mode: str = "clean", train: bool = False, rng: jax.Array | None = None,
                 probes=None) -> jax.Array:
        """Predictions float32 ``[B, n_out]`` for a :class:`GraphBatch` (padding graphs included).

        A numpy ``jraph.GraphsTuple`` (one graph or a ``jraph.batch_np`` of several) is also
        accepted outside ``jit``: it is padded with the encodings this model needs
        (:func:`graphs.data.batch_graphs`) and the predictions of its real graphs ``[G, n_out]``
        are returned. Raises TypeError for any other batch type (or a traced GraphsTuple),
        ValueError for node/edge features whose width does not match the config.
        """
        if isinstance(batch, jraph.GraphsTuple):
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(batch)):
                raise TypeError("batch: a traced jraph.GraphsTuple cannot be padded inside jit; "
                                "build a GraphBatch outside jit with graphs.data.batch_graphs("
                                "graphs, model.cfg.batch_spec()) or graphs.data.make_batches")
            padded = batch_graphs(batch, self.cfg.batch_spec())
            n_real = int(np.asarray(padded.graph_mask).sum())
            return self(padded, gates, mode=mode, train=train, rng=rng, probes=probes)[:n_real]
        self._check(batch, gates, mode, probes)
        if train and rng is None:
            raise ValueError("train=True needs rng (dropout, Gumbel noise, drop path)")
        drop_rng = rng if train else None
        if self.cfg.backbone == "gps":
            return self._gps(batch, gates, mode, train, rng, drop_rng, probes)
        if self.cfg.backbone == "graphtrans":
            return self._graphtrans(batch, gates, mode, train, rng, drop_rng, probes)
        return self._graphormer(batch, gates, mode, train, rng, drop_rng, probes)

    # -- GraphGPS ---------------------------------------------------------------------------------
    def _gps(self, b, gates, mode, train, rng, drop_rng, probes):
        cfg, g = self.cfg, b.graph
        h = _encode_nodes(self.node_enc, g.nodes)
        if self.pe_lin is not None:
            pe = b.pe
            if cfg.pe == "lap" and train:
                sign = jax.random.rademacher(_rng(rng, 1), (b.graph_mask.shape[0], pe.shape[1]))
                pe = pe * sign[b.node_graph].astype(pe.dtype)
            h = jnp.concatenate([h, self.pe_lin(pe)], -1)
        e = self.edge_enc(g.edges) if self.edge_enc is not None else None
        B, M = b.dense_index.shape
        node_mask = b.node_mask
        for li, layer in enumerate(self.layers):
            r = _rng(rng, 100 + li)
            h_in = h
            hm = layer.mpnn(h, g.senders, g.receivers, b.edge_mask, e)
            hm = layer.ln_m(h + dropout(hm, cfg.dropout, _rng(drop_rng, 100 + li, 1)))
            probe = None if probes is None else probes[li]
            if cfg.attention == "dense":
                x = to_dense(h, b.dense_index, b.dense_mask)
                ya = layer.block(x, b.dense_mask, always=None, bias=None, gates=gates, li=li,
                                 mode=mode, train=train, rng=r, probe=probe,
                                 gather=self._gather_ratio(li))
                bg = _branch_gate(gates, li, mode, train, _rng(r, 2), (B, M))
                if bg is not None:
                    ya = ya * bg[..., None].astype(ya.dtype)
                ya = to_flat(ya, b.node_graph, b.node_pos, node_mask)
            else:
                ya = self._gps_segment(layer, h, b, gates, li, mode, train, r)
            ha = layer.ln_a(h + dropout(ya, cfg.dropout, _rng(drop_rng, 100 + li, 3)))
            hs = hm + ha
            units = None if gates is None else gates.ffn_units[li]
            h = layer.ln_f(hs + dropout(layer.ffn(hs, units), cfg.dropout,
                                        _rng(drop_rng, 100 + li, 4)))
            lg = _layer_gate(gates, li, mode, train, _rng(r, 5), B)
            if lg is not None:
                h = _mix(lg[b.node_graph][:, None].astype(h.dtype), h, h_in)
        hm_ = h * node_mask[:, None].astype(h.dtype)
        pooled = jax.ops.segment_sum(hm_, b.node_graph, num_segments=B)
        if cfg.readout == "mean":
            cnt = jax.ops.segment_sum(node_mask.astype(h.dtype), b.node_graph, num_segments=B)
            pooled = pooled / jnp.maximum(cnt, 1.0)[:, None]
        return self._head(pooled)

    def _gps_segment(self, layer, h, b, gates, li, mode, train, r):
        attn = layer.block.attn
        key_mask, q_mult = b.node_mask, None
        hg = hk = None
        if gates is not None:
            hh = gates.head[li, :attn.n_heads]
            hg, hk = (hh, None) if mode == "clean" else (None, hh)
            scores = layer.block.scorer(to_dense(h, b.dense_index, b.dense_mask))[..., 0]
            mask, hard, _ = select_tokens(scores, b.dense_mask, gates.token_keep[li], mode=mode,
                                          train=train, rng=_rng(r, 7))
            mflat = to_flat(mask[..., None], b.node_graph, b.node_pos, b.node_mask)
            if mode == "faithful":
                h = h * mflat
            else:
                hflat = to_flat(hard[..., None].astype(h.dtype), b.node_graph, b.node_pos,
                                b.node_mask)[:, 0]
                key_mask = key_mask & (hflat > 0)
                q_mult = mflat
        if self._gather_ratio(li) is not None:
            raise ValueError("physical token gather needs attention='dense'")
        y = attn.segment(h, b.fc_senders, b.fc_receivers, key_mask, head_gate=hg,
                         head_kernel_mask=hk)
        if mode == "faithful" and gates is not None and train:
            bg = jax.random.bernoulli(_rng(r, 2), 1.0 - gates.drop_path, (h.shape[0],))
            y = y * jnp.where(bg, 1.0 / (1.0 - gates.drop_path), 0.0)[:, None]
        return y if q_mult is None else y * q_mult

    # -- GraphTrans -------------------------------------------------------------------------------
    def _graphtrans(self, b, gates, mode, train, rng, drop_rng, probes):
        cfg, g = self.cfg, b.graph
        h = _encode_nodes(self.node_enc, g.nodes)
        e = self.edge_enc(g.edges) if self.edge_enc is not None else None
        for i, (gnn, ln) in enumerate(zip(self.gnn, self.gnn_ln)):
            h = ln(h + dropout(jax.nn.relu(gnn(h, g.senders, g.receivers, b.edge_mask, e)),
                               cfg.dropout, _rng(drop_rng, 50 + i)))
        h = self.proj(h)
        x = to_dense(h, b.dense_index, b.dense_mask)
        B, M, d = x.shape
        x = jnp.concatenate([x, jnp.broadcast_to(self.cls[...], (B, 1, d)).astype(x.dtype)], 1)
        valid = jnp.concatenate([b.dense_mask, jnp.ones((B, 1), bool)], 1)
        always = jnp.concatenate([jnp.zeros((B, M), bool), jnp.ones((B, 1), bool)], 1)
        x = self._post_norm_stack(x, valid, always, None, gates, mode, train, rng, drop_rng, probes)
        return self._head(self.final_ln(x[:, -1]))

    def _post_norm_stack(self, x, valid, always, bias, gates, mode, train, rng, drop_rng, probes):
        cfg = self.cfg
        B, T, _ = x.shape
        for li, layer in enumerate(self.layers):
            r = _rng(rng, 100 + li)
            x_in = x
            ya = layer.block(x, valid, always=always, bias=bias, gates=gates, li=li, mode=mode,
                             train=train, rng=r, probe=None if probes is None else probes[li],
                             gather=self._gather_ratio(li))
            bg = _branch_gate(gates, li, mode, train, _rng(r, 2), (B, T))
            if bg is not None:
                ya = ya * bg[..., None].astype(ya.dtype)
            x = layer.ln1(x + dropout(ya, cfg.dropout, _rng(drop_rng, 100 + li, 3)))
            units = None if gates is None else gates.ffn_units[li]
            x = layer.ln2(x + dropout(layer.ffn(x, units), cfg.dropout,
                                      _rng(drop_rng, 100 + li, 4)))
            lg = _layer_gate(gates, li, mode, train, _rng(r, 5), B)
            if lg is not None:
                x = _mix(lg[:, None, None].astype(x.dtype), x, x_in)
        return x

    # -- Graphormer -------------------------------------------------------------------------------
    def graphormer_bias(self, b: GraphBatch) -> jax.Array:
        """Attention bias float32 ``[B, H, M+1, M+1]``: spatial + edge encoding, VNode scalar."""
        cfg = self.cfg
        spd = b.spd
        S = cfg.max_spd
        idx = jnp.where(spd < 0, S - 1, jnp.minimum(spd, S - 2))
        bias = self.spatial(idx)                                            # [B, M, M, H]
        if self.edge_enc is not None:
            E = b.graph.senders.shape[0]
            emb = self.edge_enc(b.graph.edges) * b.edge_mask[:, None]
            emb = jnp.concatenate([emb, jnp.zeros((1, emb.shape[1]), emb.dtype)], 0)
            pe = emb[jnp.where(b.path_edges < 0, E, b.path_edges)]       # [B, M, M, K, H]
            enc = jnp.einsum("bijkh,khg->bijg", pe, self.hop_w[...])
            hops = jnp.clip(spd, 1, cfg.max_hops).astype(enc.dtype)
            bias = bias + enc / hops[..., None]
        bias = jnp.transpose(bias, (0, 3, 1, 2)).astype(jnp.float32)
        B, H, M, _ = bias.shape
        vb = jnp.broadcast_to(self.vnode_bias[...][None, :, None, None], (B, H, 1, 1))
        full = jnp.concatenate([jnp.broadcast_to(vb, (B, H, 1, M)), bias], 2)
        col = jnp.broadcast_to(vb, (B, H, M + 1, 1))
        return jnp.concatenate([col, full], 3)

    def _graphormer(self, b, gates, mode, train, rng, drop_rng, probes):
        cfg, g = self.cfg, b.graph
        h = _encode_nodes(self.node_enc, g.nodes)
        h = h + self.deg_emb(jnp.clip(b.degree, 0, cfg.max_degree))
        x = to_dense(h, b.dense_index, b.dense_mask)
        B, M, d = x.shape
        x = jnp.concatenate([jnp.broadcast_to(self.vnode[...], (B, 1, d)).astype(x.dtype), x], 1)
        valid = jnp.concatenate([jnp.ones((B, 1), bool), b.dense_mask], 1)
        always = jnp.concatenate([jnp.ones((B, 1), bool), jnp.zeros((B, M), bool)], 1)
        bias = self.graphormer_bias(b)
        x = dropout(x, cfg.dropout, _rng(drop_rng, 60))
        for li, layer in enumerate(self.layers):
            r = _rng(rng, 100 + li)
            x_in = x
            lb = bias if cfg.head_ids is None else bias[:, jnp.array(cfg.head_ids[li])]
            ya = layer.block(layer.ln1(x), valid, always=always, bias=lb, gates=gates, li=li,
                             mode=mode, train=train, rng=r,
                             probe=None if probes is None else probes[li],
                             gather=self._gather_ratio(li))
            bg = _branch_gate(gates, li, mode, train, _rng(r, 2), (B, M + 1))
            if bg is not None:
                ya = ya * bg[..., None].astype(ya.dtype)
            x = x + dropout(ya, cfg.dropout, _rng(drop_rng, 100 + li, 3))
            units = None if gates is None else gates.ffn_units[li]
            x = x + dropout(layer.ffn(layer.ln2(x), units), cfg.dropout,
                            _rng(drop_rng, 100 + li, 4))
            lg = _layer_gate(gates, li, mode, train, _rng(r, 5), B)
            if lg is not None:
                x = _mix(lg[:, None, None].astype(x.dtype), x, x_in)
        return self._head(self.final_ln(x[:, 0]))


def make_model(cfg: GTConfig, seed: int = 0) -> GraphModel:
    return GraphModel(cfg, rngs=nnx.Rngs(seed))


def config_for(dataset, backbone: str, **kw) -> GTConfig:
    """A config whose input/output sizes match ``dataset`` (a :class:`graphs.data.GraphDataset`)."""
    return GTConfig(backbone=backbone, n_out=dataset.num_outputs, node_vocab=dataset.node_vocab,
                    node_dim=0 if dataset.node_vocab else dataset.node_dim,
                    edge_vocab=dataset.edge_vocab, **kw)
