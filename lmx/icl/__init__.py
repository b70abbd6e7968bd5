"""In-context demonstration selection (TopK, MDL, ConE) and ICL inference.

Paper: Peng et al., "Revisiting Demonstration Selection Strategies in In-Context Learning",
ACL 2024, arXiv:2401.12087 (TopK+ConE, Sec. 3). Baselines follow OpenICL (Wu et al. 2023a,
arXiv:2303.02913). Guide: ``docs/icl.md``.
"""
from lmx.icl.cone import cone_rerank, cone_scores, cone_sequence
from lmx.icl.encoder import BertConfig, BertModel, SentenceEncoder, load_minilm, minilm_path
from lmx.icl.inference import (build_prompt_ids, generate, generate_classify, parse_label,
                               ppl_classify)
from lmx.icl.lm import ScoringLM, choice_logprobs, from_lmx, sequence_logprobs, span_nll
from lmx.icl.mdl import label_entropy, mdl_candidate_sets, mdl_rerank
from lmx.icl.retrieval import l2_normalize, pool_mesh, topk_cosine
from lmx.icl.retrievers import (METHODS, DemoPool, cone_retrieve, mdl_retrieve, random_retrieve,
                                retrieve, topk_retrieve)
from lmx.icl.templates import SST2_TEMPLATE, PromptTemplate

__all__ = ["BertConfig", "BertModel", "SentenceEncoder", "load_minilm", "minilm_path",
           "topk_cosine", "l2_normalize", "pool_mesh", "PromptTemplate", "SST2_TEMPLATE",
           "ScoringLM", "from_lmx", "sequence_logprobs", "choice_logprobs", "span_nll", "cone_sequence",
           "cone_scores", "cone_rerank", "label_entropy", "mdl_candidate_sets", "mdl_rerank",
           "build_prompt_ids", "ppl_classify", "generate", "generate_classify", "parse_label",
           "DemoPool", "METHODS", "random_retrieve", "topk_retrieve", "mdl_retrieve",
           "cone_retrieve", "retrieve"]
