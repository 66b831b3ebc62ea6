"""The RAIS sampler: the robust distribution of a learned uncertainty set.

Each example i has features s_i (:mod:`rais_jax.features`); the uncertainty
set U = {v ≥ 0 : Σ_i (v_i − a_i)²/b_i ≤ 1} with a_i = ⟨c, s_i⟩,
b_i = ⟨d, s_i⟩ has the minimax distribution (:mod:`rais_jax.robust`)

    p_i = (1 − ε) (a_i + k b_i) / (A + k B) + ε / n,   k = B^(-1/2),

sampled from sum-trees in O(m log n) (:mod:`rais_jax.tree_sampler`). Every
measured norm enters the features and the ring buffer D; every (PT) period
(:mod:`rais_jax.pt`) a snapshot of D is solved for new (c, d), applied a fixed
delay later. Until the first solution is applied, sampling is uniform.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import functools
from typing import Optional

from rais_jax import tree_sampler as ts
from rais_jax.features import FeatureMap
from rais_jax.pt import periodic
from rais_jax.sampler import Sampler, check_common


def rais_sampler(features: FeatureMap, *, batch_size: int,
                 buffer_size: Optional[int] = None, floor: float = 1e-3,
                 pt_period: Optional[int] = None,
                 pt_delay: Optional[int] = None, pt_mode: str = "async",
                 pt_max_iters: int = 1000, ema_rate: float = 0.1,
                 r_max: Optional[float] = None) -> Sampler:
  """Robust, approximate importance sampling (RAIS).

  Args:
    features: the per-example :class:`~rais_jax.features.FeatureMap`.
    batch_size: m, the number of indices per step.
    buffer_size: ``|D|``, default min(n, 65536).
    floor: ε, the uniform share of the sampling mass.
    pt_period: steps between (PT) solves, default ⌈ ``|D|`` / m ⌉ (one refill of D).
    pt_delay: steps from a solve's submission to its application, in
      [1, pt_period]; default pt_period: an asynchronous solve has a whole
      period of training to finish in, and the fast path applies it and
      takes the next snapshot at one boundary.
    pt_mode: how the per-step API (:func:`rais_jax.make_train_step`) solves:
      ``"async"`` (a host thread via ``io_callback``) or ``"sync"``
      (in-graph); the fast path solves on a host thread, and waits for each
      solve with ``"sync"``. Both give identical runs.
    pt_max_iters: iteration cap of each solve.
    ema_rate: α of the gain-ratio moving averages.
    r_max: upper clip of the gain ratio, default m.

  Returns:
    A :class:`~rais_jax.Sampler`.
  """
  n = features.num_examples
  check_common(n, batch_size, floor)
  buffer_size = min(n, 65536) if buffer_size is None else buffer_size
  if buffer_size < 1:
    raise ValueError(f"buffer_size must be ≥ 1; got {buffer_size}.")
  spec = ts.TreeSpec(feature_map=features, batch_size=batch_size,
                     leaves=ts.robust_leaves, scale=ts.robust_scale, floor=floor,
                     buffer_size=buffer_size, keeps_records=True, fitted=False)
  bind = lambda fn: functools.partial(fn, spec)
  set_parameters = bind(ts.set_parameters)
  pt = periodic.periodic_solve(
      features, set_parameters, buffer_size=buffer_size, batch_size=batch_size,
      period=pt_period, delay=pt_delay, mode=pt_mode, max_iters=pt_max_iters)
  return Sampler(
      name="rais", num_examples=n, batch_size=batch_size,
      feature_names=tuple(features.names), init=bind(ts.init), draw=bind(ts.draw),
      fold_in=bind(ts.fold_in), measures_norms=True, boosts_lr=True,
      ema_rate=ema_rate, r_max=r_max, pt=pt, probabilities=bind(ts.probabilities),
      set_parameters=set_parameters)
