"""Prompting methods over chat backends: IAPrompt (jailbreak defence), POMP (meta-graph prompting
for low-resource MT) and WisdoM (context-augmented sentiment with contextual fusion).

Specs: shared/specs/iaprompt_wisdom_oop.md parts A-B, shared/specs/icl_pomp.md part B.
"""
from lmx.prompting.iaprompt import (CT_PROMPT, GCG_REFUSALS, IA_PROMPT, ONE_PASS_PROMPT, IAConfig,
                                    IAOutput, asr_keyword, ia_defend, ia_messages_one_pass,
                                    ia_messages_stage1, ia_messages_stage2, ia_stage1_text,
                                    undefended, vicuna_v11_prompt)
from lmx.prompting.pomp import (ConsensusScorer, Graph, GraphMasks, MTExample, POMPConfig, POMPState,
                                ReferenceScorer, aggregate_prompt, credit, generate_prompt,
                                init_probs, pomp_infer, pomp_train, run_graphs, sample_fixed_graph,
                                sample_graph, squash, update, window_table)
from lmx.prompting.wisdom import (CONTEXT_TEMPLATES, WisdomOutput, classification_prompt,
                                  context_messages, contextual_fusion, generate_contexts,
                                  score_options, tune_fusion, wisdom_context_prompt, wisdom_predict)

__all__ = [
    "IA_PROMPT", "CT_PROMPT", "ONE_PASS_PROMPT", "GCG_REFUSALS", "IAConfig", "IAOutput", "ia_defend",
    "undefended", "ia_stage1_text", "ia_messages_stage1", "ia_messages_stage2",
    "ia_messages_one_pass", "vicuna_v11_prompt", "asr_keyword",
    "ConsensusScorer", "ReferenceScorer", "Graph", "GraphMasks", "MTExample", "POMPConfig",
    "POMPState", "init_probs", "window_table", "sample_graph", "credit", "squash", "update",
    "generate_prompt", "aggregate_prompt", "run_graphs", "pomp_train", "pomp_infer",
    "sample_fixed_graph",
    "CONTEXT_TEMPLATES", "WisdomOutput", "wisdom_context_prompt", "context_messages",
    "classification_prompt", "contextual_fusion", "generate_contexts", "score_options",
    "wisdom_predict", "tune_fusion",
]
