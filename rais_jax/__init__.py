"""rais_jax: robust, approximate importance sampling (RAIS) for SGD in JAX.

Johnson & Guestrin, "Training Deep Models Faster with Robust, Approximate
Importance Sampling", NeurIPS 2018.
"""

from rais_jax import block_sampler, ghost, records, selection, separability, sum_tree
from rais_jax.block_sampler import SamplerConfig
from rais_jax.features import FeatureMap, default_features, static_features
from rais_jax.gain_ratio import GainRatioState
from rais_jax.norms import (choose_method, per_example_grad_norms, softmax_cross_entropy_proxy_norms,
                            value_grad_and_norms)
from rais_jax.pt_solver import PTInfo, pt_constraint, solve_pt
from rais_jax.runner import Runner, RunnerState, make_runner
from rais_jax.robust import robust_probabilities, worst_case_second_moment
from rais_jax.sampler import (Sample, Sampler, SamplerState, infobatch, loss_sampler,
                              naive_sampler, oracle_sampler, rais_sampler,
                              selective_backprop, uniform_sampler)
from rais_jax.train import (StepMetrics, TrainState, evaluate, init_train_state,
                            make_train_step, softmax_cross_entropy_head)
from rais_jax.transform import (ScaleByGainRatioState, epochs_equivalent,
                                equivalent_iterations, rais_sgd, scale_by_gain_ratio)

__version__ = "0.1.0"

__all__ = [
    "FeatureMap", "GainRatioState", "PTInfo", "Sample", "Sampler", "SamplerState",
    "ScaleByGainRatioState", "StepMetrics", "TrainState", "default_features",
    "epochs_equivalent", "equivalent_iterations", "evaluate", "init_train_state",
    "make_runner", "make_train_step", "Runner", "RunnerState", "oracle_sampler", "per_example_grad_norms", "pt_constraint",
    "rais_sampler", "rais_sgd", "robust_probabilities", "scale_by_gain_ratio",
    "softmax_cross_entropy_head", "softmax_cross_entropy_proxy_norms", "solve_pt",
    "static_features", "sum_tree", "uniform_sampler", "value_grad_and_norms",
    "worst_case_second_moment", "ghost", "block_sampler", "records", "SamplerConfig",
    "naive_sampler", "loss_sampler", "selective_backprop", "infobatch", "selection",
    "choose_method", "separability",
]
