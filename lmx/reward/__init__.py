"""Reward models: Bradley-Terry RM, InfoRM variational bottleneck, ICDS/CSI overoptimization
detector, best-of-n tools. InfoRM: Miao et al., NeurIPS 2024, arXiv:2402.09345; guide:
``docs/reward.md``."""
from lmx.reward.best_of_n import (best_of_n_draws, best_of_n_expectation, best_of_n_kl,
                                  best_of_n_weights)
from lmx.reward.icds import (OveroptimizationMonitor, cluster_deviation_score, csi, default_eps,
                             project)
from lmx.reward.losses import (bradley_terry_loss, center_penalty, gaussian_kl, normalize_rewards,
                               pair_accuracy, reward_pair_losses, reward_stats, split_pairs)
from lmx.reward.model import (InfoHead, RewardConfig, RewardModel, RewardOutput, ScalarHead,
                              backbone_hidden, make_head)
from lmx.reward.pooling import check_eos, last_token_index, pool_last
from lmx.reward.trainer import (check_pair_batch, collate_pairs, encode_latents, evaluate,
                                fit_reward_normalization, load_reward_model, pair_losses,
                                reward_loss_fn, save_reward_model)

__all__ = [
    "best_of_n_draws", "best_of_n_expectation", "best_of_n_kl", "best_of_n_weights",
    "OveroptimizationMonitor", "cluster_deviation_score", "csi", "default_eps", "project",
    "bradley_terry_loss", "center_penalty", "gaussian_kl", "normalize_rewards", "pair_accuracy",
    "reward_pair_losses", "reward_stats", "split_pairs",
    "InfoHead", "RewardConfig", "RewardModel", "RewardOutput", "ScalarHead", "backbone_hidden",
    "make_head", "check_eos", "last_token_index", "pool_last",
    "check_pair_batch", "collate_pairs", "encode_latents", "evaluate", "fit_reward_normalization",
    "load_reward_model", "pair_losses", "reward_loss_fn", "save_reward_model",
]
