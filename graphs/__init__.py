"""Graph Transformers (GraphTrans, Graphormer, GraphGPS) on jraph with GTSP sparsification.

See docs/graphs.md. Papers: GTSP (Liu et al. 2023, arXiv:2312.05479), GraphTrans (Wu et al. 2021,
arXiv:2201.08821), Graphormer (Ying et al. 2021, arXiv:2106.05234), GraphGPS (Rampasek et al.
2022, arXiv:2205.12454). Modules: ``data`` (GraphsTuple batches, featurisation, offline
datasets), ``models`` (backbones + GTSP gates), ``gtsp`` (schedules, mask updates, clean export),
``flops`` (analytic counter), ``metrics`` (OGB definitions), ``train`` (GTSP step factories,
fit, evaluate, checkpoints), ``parallel`` (data mesh).
"""
from graphs.data import (BatchSpec, GraphBatch, GraphDataset, batch_graphs, collate,
                         key_retrieval, load_freesolv, load_mutag,
                         load_nci_tpsa, load_ogb_raw, load_solubility, make_batches,
                         smiles_to_graph, spd_parity, validate_graphs)
from graphs.gtsp import GTSPConfig, export_clean
from graphs.models import Gates, GraphModel, GTConfig, config_for, full_gates, make_model
from graphs.train import FitConfig, GTSPMasks, GTSPSteps, evaluate, fit, make_gtsp_steps

__all__ = ["BatchSpec", "GraphBatch", "GraphDataset", "batch_graphs", "collate",
           "key_retrieval", "load_freesolv", "load_mutag", "load_nci_tpsa",
           "load_ogb_raw", "load_solubility", "make_batches", "smiles_to_graph", "spd_parity",
           "validate_graphs", "GTSPConfig", "export_clean", "Gates", "GraphModel", "GTConfig",
           "config_for", "full_gates", "make_model", "FitConfig", "GTSPMasks", "GTSPSteps", "evaluate",
           "fit", "make_gtsp_steps"]
