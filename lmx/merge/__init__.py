"""Model merging: task vectors, data-free merges (averaging, task arithmetic, TIES, DARE),
closed-form data merges (RegMean, Fisher), learned merges (AdaMerging, Concrete TA/AM), and a
streamed safetensors runner. See docs/merge.md; each function's docstring cites its paper."""
from lmx.merge.learned import (AdaMergingConfig, ConcreteConfig, MergeResult, adamerging,
                               concrete_adamerging, concrete_merge, concrete_task_arithmetic,
                               entropy, entropy_objective, make_adamerging_step,
                               make_concrete_am_step, make_concrete_ta_step,
                               merge_with_coefficients, relaxed_bernoulli, rescale_mask,
                               sample_mask)
from lmx.merge.methods import (Average, Dare, TaskArithmetic, Ties, average, dare,
                               fisher_merging, input_gram, merge_tree, regmean, task_arithmetic,
                               ties_merging)
from lmx.merge.runner import build_method, run_merge
from lmx.merge.streaming import (SafetensorsCheckpoint, SafetensorsWriter, load_safetensors,
                                 save_safetensors, stream_merge)
from lmx.merge.tree import (check_compatible, float_leaf_names, named_leaves, stack, task_vector,
                            task_vectors)

__all__ = [
    "AdaMergingConfig", "Average", "ConcreteConfig", "Dare", "MergeResult", "SafetensorsCheckpoint",
    "SafetensorsWriter", "TaskArithmetic", "Ties", "adamerging", "average", "build_method",
    "check_compatible", "concrete_adamerging", "concrete_merge", "concrete_task_arithmetic", "dare",
    "entropy", "entropy_objective", "fisher_merging", "float_leaf_names", "input_gram",
    "load_safetensors", "make_adamerging_step", "make_concrete_am_step", "make_concrete_ta_step",
    "merge_tree", "merge_with_coefficients", "named_leaves", "regmean",
    "relaxed_bernoulli", "rescale_mask", "run_merge", "sample_mask", "save_safetensors", "stack",
    "stream_merge", "task_arithmetic", "task_vector", "task_vectors", "ties_merging",
]
