"""rais_jax: robust, approximate importance sampling (RAIS) for SGD in JAX.

Johnson & Guestrin, "Training Deep Models Faster with Robust, Approximate
Importance Sampling", NeurIPS 2018.
"""

from rais_jax import (augment, baselines, ghost, gain_ratio, pt, records, schedule,
                      separability, sum_tree, tree_sampler)
from rais_jax.features import FeatureMap, default_features, static_features
from rais_jax.losses import evaluate, softmax_cross_entropy_head
from rais_jax.model import StatefulModel, inference
from rais_jax.norms import (choose_method, per_example_grad_norms,
                            softmax_cross_entropy_proxy_norms, value_grad_and_norms)
from rais_jax.oracle import oracle_sampler
from rais_jax.pt import PTInfo, solve_pt
from rais_jax.rais import rais_sampler
from rais_jax.robust import robust_probabilities, worst_case_second_moment
from rais_jax.runner import Runner, make_runner
from rais_jax.sampler import Sample, Sampler, uniform_sampler
from rais_jax.step import StepMetrics, TrainState, init_train_state
from rais_jax.train import make_train_step
from rais_jax.transform import (epochs_equivalent, equivalent_iterations, inject_hyperparams,
                                multi_steps, rais_sgd, scale_by_gain_ratio)

__version__ = "0.1.0"

__all__ = [
    "FeatureMap",
    "PTInfo",
    "Runner",
    "Sample",
    "Sampler",
    "StatefulModel",
    "StepMetrics",
    "TrainState",
    "augment",
    "baselines",
    "choose_method",
    "default_features",
    "epochs_equivalent",
    "equivalent_iterations",
    "evaluate",
    "inference",
    "init_train_state",
    "inject_hyperparams",
    "make_runner",
    "make_train_step",
    "multi_steps",
    "oracle_sampler",
    "per_example_grad_norms",
    "pt",
    "rais_sampler",
    "rais_sgd",
    "robust_probabilities",
    "scale_by_gain_ratio",
    "softmax_cross_entropy_head",
    "softmax_cross_entropy_proxy_norms",
    "solve_pt",
    "static_features",
    "uniform_sampler",
    "value_grad_and_norms",
    "worst_case_second_moment",
]
