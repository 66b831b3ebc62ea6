"""Small problems and stand-ins shared by the training-loop tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

import rais_jax as rj
from rais_jax.experiments.models import MLP, functional


def classification(n: int, classes: int):
  """(data, model_fn, params, labels): Gaussian classes in 8-D, an MLP 8-32."""
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 1, (classes, 8))
  labels = rng.integers(0, classes, n)
  x = centres[labels] + rng.normal(0, 1.0, (n, 8))
  data = {"x": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels, jnp.int32)}
  model_fn, params = functional(MLP(8, [32], classes, rngs=nnx.Rngs(0)))
  return data, model_fn, params, labels


def sampler(method: str, labels, classes: int, batch_size: int, *,
            buffer_size: int, mode: str = "async", pt_delay=None) -> rj.Sampler:
  """The sampler of U-SGD ("usgd"), O-SGD ("osgd"), RAIS ("rais", with
  ``pt_delay``) or the importance-sampling baselines ("naive", "loss-is")."""
  n = len(labels)
  if method == "usgd":
    return rj.uniform_sampler(n, batch_size=batch_size)
  if method == "naive":
    return rj.baselines.naive_sampler(n, batch_size=batch_size, floor=0.3)
  if method == "loss-is":
    return rj.baselines.loss_sampler(n, batch_size=batch_size, floor=0.3)
  if method == "osgd":
    return rj.oracle_sampler(n, batch_size=batch_size)
  return rj.rais_sampler(rj.default_features(labels, classes), batch_size=batch_size,
                         buffer_size=buffer_size, pt_mode=mode, pt_delay=pt_delay)


def broken_solver(failure: str):
  """A stand-in for ``solve_pt`` that raises (``"raise"``) or returns NaN."""
  def solve(features, norms, probs, feature_sum, *, init, max_iters):
    if failure == "raise":
      raise RuntimeError("solver exploded")
    c, d, info = rj.solve_pt(features, norms, probs, feature_sum, init=init,
                             max_iters=max_iters)
    return c * jnp.nan, d, info._replace(ok=jnp.zeros((), bool))
  return solve


def fitted_sampler(n=1000, m=256, floor=0.05, seed=0, num_classes=4):
  """(sampler, state, fmap, c, d): a RAIS sampler whose state samples from
  random (c, d) over distinct last norms (far from uniform). The per-step
  state also serves the block functions, which read the same fields."""
  rng = np.random.default_rng(seed)
  fmap = rj.default_features(rng.integers(0, num_classes, n), num_classes)
  sampler = rj.rais_sampler(fmap, batch_size=m, floor=floor, pt_mode="sync")
  state = sampler.init()
  idx = jnp.arange(n)
  state = state.replace(features=fmap.update(
      state.features, idx, jnp.asarray(rng.lognormal(0, 1, n), jnp.float32),
      jnp.asarray(rng.uniform(size=n) < 0.8)))
  c = jnp.asarray(rng.uniform(0, 1, fmap.num_features), jnp.float32)
  d = jnp.asarray(rng.uniform(0, 1, fmap.num_features), jnp.float32)
  return sampler, sampler.set_parameters(state, c, d), fmap, c, d


def synthetic_step(sampler, carry, key, norms_fn, grad_sq_norm=1.0, inner=None):
  """One per-step sampler update on synthetic norms, as make_train_step does
  it: draw, fold in, the gain-ratio moments, the (PT) hand-off. ``carry`` is
  (sampler state, moments, step); returns it and (the draw, r used)."""
  state, moments, step = carry
  s = sampler.sample(state, key)
  u = jnp.asarray(norms_fn(s.indices), jnp.float32)
  r = rj.gain_ratio.estimate(moments, sampler.batch_size, r_max=sampler.r_max)
  state = sampler.fold_in(state, s, u)
  moments = rj.gain_ratio.update(moments, u, s.probs, sampler.num_examples,
                                 jnp.float32(grad_sq_norm), grad_halves_inner=inner,
                                 alpha=sampler.ema_rate)
  step = step + 1
  if sampler.pt is not None:
    state = rj.pt.periodic.advance(sampler.pt, state, step)
  return (state, moments, step), (s, r)


def synthetic_start(sampler):
  return sampler.init(), rj.gain_ratio.init(), jnp.zeros((), jnp.int32)


def baseline_runner(model_fn, sampler, block_size=4):
  """A fast-path runner for a method that measures no norms (SGD + momentum)."""
  return rj.make_runner(model_fn, rj.softmax_cross_entropy_head(),
                        rj.rais_sgd(0.05, momentum=0.9), sampler, norms=None,
                        block_size=block_size)
