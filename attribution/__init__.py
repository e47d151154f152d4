"""Lightning-free attribution core: step-specific TRAK for diffusion models.

Pipeline: :class:`DiffusionTask` (how to call the denoiser) -> :class:`TrainLoss` /
:class:`StepOutput` (what is differentiated, with deterministic draws) -> :func:`featurize_batch`
(vmap per-example gradients + a :class:`Projector`) -> :class:`FeatureStore` (resumable memmap)
-> :func:`finalize` (kernel eigendecomposition) -> :func:`score` / :func:`topk_scores` /
:func:`lambda_sweep`.

This package never imports lightning (a test checks it).
"""
from .diffusion import (PREDICTION_TYPES, add_noise, alphas_cumprod_from, prediction_target, schedule_coefficients,
                        split_prediction, x0_hat)
from .fastpath import featurize_batch
from .gradients import (loop_gradients, num_parameters, parameter_order, per_example_gradients,
                        split_parameters)
from .outputs import Draws, ModelOutput, StepOutput, TrainLoss, make_output
from .projectors import DenseProjector, IdentityProjector, Projector, SparseProjector, make_projector
from .scoring import (KernelEigen, TopK, dense_scores_float64, finalize, iter_score_blocks, lambda_sweep, load_kernel,
                      relative_lambda, score, topk_scores)
from .seeding import checkpoint_seed, cpu_generator, mix_seed
from .store import FeatureStore, StoreMismatchError
from .task import DiffusionTask, math_attention

__all__ = [
    "PREDICTION_TYPES", "add_noise", "alphas_cumprod_from", "prediction_target", "schedule_coefficients",
    "split_prediction", "x0_hat",
    "featurize_batch", "loop_gradients", "num_parameters", "parameter_order", "per_example_gradients",
    "split_parameters",
    "Draws", "ModelOutput", "StepOutput", "TrainLoss", "make_output",
    "DenseProjector", "IdentityProjector", "Projector", "SparseProjector", "make_projector",
    "KernelEigen", "TopK", "dense_scores_float64", "finalize", "iter_score_blocks", "lambda_sweep", "load_kernel",
    "relative_lambda",
    "score", "topk_scores",
    "checkpoint_seed", "cpu_generator", "mix_seed",
    "FeatureStore", "StoreMismatchError",
    "DiffusionTask", "math_attention",
]

# Counterfactual evaluation: LDS statistics and baselines (figures: `attribution.plots`, lazy matplotlib).
# `lds` itself is exported as `linear_datamodeling_score` so that `attribution.lds` stays the module.
from .baselines import (SmallConvClassifier, class_fraction, classifier_features, embedding_cosine_scores,
                        fid_from_features, pixel_cosine_scores, random_scores, topk_indices, train_classifier)
from .lds import (LambdaChoice, LDSResult, SeedNoiseCeiling, choose_lambda_heldout, lds_per_lambda, lds_table,
                  linear_datamodeling_score, paired_difference, predicted_outputs, seed_noise_ceiling,
                  spearman_columns, split_targets, write_table)

__all__ += [
    "SmallConvClassifier", "class_fraction", "classifier_features", "embedding_cosine_scores", "fid_from_features",
    "pixel_cosine_scores", "random_scores", "topk_indices", "train_classifier",
    "LambdaChoice", "LDSResult", "SeedNoiseCeiling", "choose_lambda_heldout", "lds_per_lambda", "lds_table",
    "linear_datamodeling_score", "paired_difference", "predicted_outputs", "seed_noise_ceiling",
    "spearman_columns", "split_targets", "write_table",
]

# Fast featurizing paths (issue 8): per-layer Kronecker projector, hashed blocked sparse JL, vmap/loop choice.
from .fastpath import CPU_VMAP_MAX_PARAMS, choose_gradient_path  # noqa: E402
from .layerwise import LayerwiseProjector, featurize_batch_layerwise  # noqa: E402
from .sparse_fast import HashedSparseProjector  # noqa: E402

__all__ += ["CPU_VMAP_MAX_PARAMS", "choose_gradient_path", "LayerwiseProjector",
            "featurize_batch_layerwise", "HashedSparseProjector"]

# EK-FAC / K-FAC influence (issue 16): Kronecker-factored curvature, eigenvalue-corrected, TRAK's sign.
from .ekfac import EKFACFactors, ekfac_damping_sweep, ekfac_gradients, ekfac_scores, fit_ekfac  # noqa: E402

__all__ += ["EKFACFactors", "ekfac_damping_sweep", "ekfac_gradients", "ekfac_scores", "fit_ekfac"]
