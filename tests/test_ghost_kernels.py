"""Each ghost kernel against the per-example gradient it replaces.

A kernel turns one example's data operand x and output cotangent δ at a site
y = op(x, W) (each test function is that one equation) into ‖∂⟨op(x, W), δ⟩/∂W‖² without forming that gradient (or
forming it where that is cheaper). The reference forms it with ``jax.grad``
of the one equation, example by example.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rais_jax.ghost import kernels, walker
from rais_jax.ghost.plan import make_plan

M = 4

pytestmark = pytest.mark.usefixtures("highest_precision")


def _sites(fn, params, *data):
  """The sites of ``fn(params, *data)`` for one example (leading axis 1)."""
  example = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype) for x in data]
  closed = jax.make_jaxpr(fn)(params, *example)
  tag = walker.Tag(leaves=frozenset([0]), iso=True, exact=True,
                   layout=0 if params.ndim == 2 else None)
  discover = walker.Walker("discover")
  discover.run(closed.jaxpr, [walker.ABSENT] * len(closed.consts),
               [walker.ABSENT] * (1 + len(data)),
               [walker.CONST] * len(closed.consts), [tag] + [walker.DATA] * len(data))
  return discover.sites


def _deltas(seed, fn, params, *data):
  """Random cotangents shaped like one example's outputs, for each of M."""
  out = jax.eval_shape(fn, params, *(x[:1] for x in data))
  return [_normal(seed + i, M, *o.shape) for i, o in enumerate(out)]


def _reference(fn, params, data, deltas):
  """Σ over the outputs of ‖∂⟨fn(W, x_k), δ_k⟩/∂W‖², per example k."""
  return jax.jit(functools.partial(_per_example_sq, fn))(params, data, deltas)


def _per_example_sq(fn, params, data, deltas):
  def one(k):  # a Python loop: the gathers' VJPs need not vmap
    g = jax.grad(lambda w: sum(jnp.vdot(o, d[k]) for o, d in zip(
        fn(w, *(x[k:k + 1] for x in data)), deltas)))(params)
    return jnp.sum(g * g)
  return jnp.stack([one(k) for k in range(M)])


def _check_site_kernel(fn, params, *data, kernel):
  listed = lambda *a: [fn(*a)]
  (site,) = _sites(listed, params, *data)
  assert kernels.site_kernel(site) is kernel
  (delta,) = _deltas(9, listed, params, *data)
  got = jax.jit(jax.vmap(lambda x, d: kernels.site_sq(site, [x[None]], d)))(
      data[0], delta)
  np.testing.assert_allclose(got, _reference(listed, params, data, [delta]), rtol=1e-5)


def _normal(seed, *shape):  # NumPy: no random kernel to compile per shape
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _integers(seed, low, high, *shape):
  return np.random.default_rng(seed).integers(low, high, shape).astype(np.int32)


@pytest.mark.parametrize("positions", [3, 40])
def test_dense(positions):
  """x (T, A) W (A, C): T = 3 takes the Gram form (T(A+C) ≤ AC), T = 40 the
  per-example outer product."""
  w = _normal(0, 8, 6)
  x = _normal(1, M, positions, 8)
  _check_site_kernel(lambda w, x: jnp.einsum("bta,ac->btc", x, w), w, x,
                     kernel=kernels.dot_general_sq)


def test_dense_weight_on_the_left_and_contracted_last():
  w = _normal(0, 6, 8)  # (C, A): y = W x
  x = _normal(1, M, 8)
  _check_site_kernel(lambda w, x: lax.dot_general(w, x, (((1,), (1,)), ((), ()))),
                     w, x, kernel=kernels.dot_general_sq)


def test_dense_with_shared_batch_dims():
  """Attention-style projections: heads are a batch dim of both operands
  (the dot_general einsum "btha,hac->bthc" emits, before its transpose)."""
  w = _normal(0, 3, 5, 4)  # (H, A, C)
  x = _normal(1, M, 7, 3, 5)  # (T, H, A)
  _check_site_kernel(
      lambda w, x: lax.dot_general(w, x, (((1,), (3,)), ((0,), (2,)))), w, x,
      kernel=kernels.dot_general_sq)


@pytest.mark.parametrize("layout,groups,strides,padding,dilation,lhs_dilation", [
    ("NHWC", 1, (1, 1), "SAME", (1, 1), (1, 1)),
    ("NCHW", 2, (2, 1), ((1, 0), (2, 1)), (1, 2), (1, 1)),
    # 2×2 output positions: the Gram form (T(window·A + C) ≤ window·A·C).
    ("NHWC", 1, (3, 3), "VALID", (1, 1), (1, 1)),
    ("NHWC", 2, (3, 4), "VALID", (1, 1), (1, 1)),  # 2 positions: Gram, grouped
    # A transposed convolution (dilated input), with a negative padding.
    ("NCHW", 2, (1, 2), ((2, 1), (-1, 2)), (1, 1), (2, 3)),
])
def test_conv(layout, groups, strides, padding, dilation, lhs_dilation):
  """A dense layer over each feature group's input patches, read as one
  strided slice per window offset."""
  cin, cout = 4, 6
  w = _normal(0, 3, 3, cin // groups, cout)  # HWIO
  x = _normal(1, M, 7, 6, cin)  # NHWC
  if layout == "NCHW":
    x = jnp.transpose(x, (0, 3, 1, 2))
    w = jnp.transpose(w, (3, 2, 0, 1))  # OIHW
  specs = (layout, "HWIO" if layout == "NHWC" else "OIHW", layout)
  conv = lambda w, x: lax.conv_general_dilated(
      x, w, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
      dimension_numbers=specs, feature_group_count=groups)
  _check_site_kernel(conv, w, x, kernel=kernels.conv_sq)


def test_conv_1d():
  """One spatial axis (a sequence convolution, NWC / WIO)."""
  w = _normal(0, 5, 3, 4)
  x = _normal(1, M, 11, 3)
  conv = lambda w, x: lax.conv_general_dilated(
      x, w, (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  _check_site_kernel(conv, w, x, kernel=kernels.conv_sq)


def _lookup(mode):
  """E[tok] as the one gather an embedding lookup is (jnp.take wraps
  negative ids first, and the gather's operand is then that result)."""
  dims = lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0,),
                                    start_index_map=(0,))
  return lambda e, tok: lax.gather(e, tok, dims, (1, e.shape[1]), mode=mode,
                                   fill_value=0.0)


@pytest.mark.parametrize("mode,length", [
    (lax.GatherScatterMode.FILL_OR_DROP, 9), (lax.GatherScatterMode.CLIP, 9),
    (lax.GatherScatterMode.FILL_OR_DROP, 600)])
def test_embedding(mode, length):
  """Rows of a repeated token add up (labels by first occurrence for short
  sequences, by sorting above 512); FILL_OR_DROP drops out-of-range ids."""
  table = _normal(0, 7, 5)
  tokens = _integers(1, -2, 9, M, length, 1)
  _check_site_kernel(_lookup(mode), table, tokens, kernel=kernels.embedding_sq)


@pytest.mark.parametrize("output_layer", ["transposed", "contracted on axis 1"])
def test_tied_embedding_and_output_layer(output_layer):
  """One weight E as the lookup table and as the output layer (h Eᵀ): the
  joint Gram over both uses equals the norm of the summed gradient."""
  table = _normal(0, 40, 6)  # the Gram form is the cheaper: 5 (40 + 6) ≤ 40 · 6
  tokens = _integers(1, 0, 40, M, 3, 1)
  tokens[:, 1] = tokens[:, 0]  # a repeated token
  hidden = _normal(2, M, 2, 6)
  lookup = _lookup(lax.GatherScatterMode.CLIP)
  if output_layer == "transposed":
    fn = lambda e, tok, h: [lookup(e, tok), h @ e.T]
  else:
    fn = lambda e, tok, h: [lookup(e, tok),
                            lax.dot_general(h, e, (((2,), (1,)), ((), ())))]
  sites = _sites(fn, table, tokens, hidden)
  plan = make_plan(sites)
  assert plan.ghost == () and plan.pulled == ()
  ((group, layouts),) = plan.shared
  assert layouts == ((0, 1) if output_layer == "transposed" else (0, 0))
  deltas = _deltas(9, fn, table, tokens, hidden)
  data = [[tokens[:, None]], [hidden[:, None]]]
  got = jax.jit(jax.vmap(lambda dt, d: kernels.shared_sq(
      sites, group, layouts, dt, [[x] for x in d])))(data, deltas)
  np.testing.assert_allclose(
      got, _reference(fn, table, (tokens, hidden), deltas), rtol=1e-5)


def test_gram_and_outer_forms_agree():
  x, d = _normal(0, 2, 5, 3), _normal(1, 2, 5, 4)
  outer = kernels.gram_or_outer_sq(x, d)  # T(A+C) = 35 > AC = 12
  kx = jnp.einsum("bta,bsa->bts", x, x)
  kd = jnp.einsum("btc,bsc->bts", d, d)
  np.testing.assert_allclose(outer, jnp.sum(kx * kd), rtol=1e-5)
