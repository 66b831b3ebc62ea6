r"""Per-primitive ghost kernels: Σ_k ‖∂f_k/∂W‖² at one site, without the
per-example gradients where that is cheaper.

For a dense layer y = x W that example k sees at positions t = 1..T,
∇_W f_k = Σ_t x_{kt} δ_{kt}ᵀ with δ_{kt} = ∂f_k/∂y_{kt}, so

.. math::

   \|\nabla_W f_k\|^2 = \sum_{t,t'} (x_{kt} \cdot x_{kt'})\,(\delta_{kt} \cdot \delta_{kt'})

(the Gram form; ‖x_k‖²‖δ_k‖² when T = 1). Where T(A + C) > A·C (A inputs,
C outputs) the per-example gradient x_kᵀδ_k is cheaper to form than the Gram
matrices, and it is formed instead. The kernels:

* ``dot_general`` with one parameter operand (dense, einsum, attention
  projections; batch dimensions such as heads are kept apart):
  :func:`dot_general_sq`;
* ``conv_general_dilated`` with the kernel as parameter, a dense layer per
  window offset and feature group over strided slices of the input:
  :func:`conv_sq`;
* an embedding ``gather`` (rows of repeated tokens add up): :func:`embedding_sq`;
* a 2-D weight used at several of those sites (a tied embedding and output
  layer): one joint Gram over all uses, :func:`shared_sq`.

Each kernel reads one example's data operand and output cotangent δ as the
one-example trace shapes them (leading size-1 axis), and is vmapped over the
examples by the caller. Goodfellow (2015), "Efficient per-example gradient
computations"; Li et al. (2022), "Large language models can be strong
differentially private learners" (ghost clipping).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
from jax import lax

from rais_jax.ghost.walker import Site

HIGHEST = lax.Precision.HIGHEST


def _f32(x):
  return x.astype(jnp.float32)


def gram_or_outer_sq(x: chex.Array, d: chex.Array) -> chex.Array:
  """‖Σ_t x_bt d_btᵀ‖² summed over b, for x (B,T,A), d (B,T,C)."""
  _, t, a = x.shape
  c = d.shape[-1]
  x, d = _f32(x), _f32(d)
  if t * (a + c) <= a * c:
    kx = jnp.einsum("bta,bsa->bts", x, x, precision=HIGHEST)
    kd = jnp.einsum("btc,bsc->bts", d, d, precision=HIGHEST)
    return jnp.sum(kx * kd)
  g = jnp.einsum("bta,btc->bac", x, d, precision=HIGHEST)
  return jnp.sum(g * g)


def dot_general_dims(site: Site):
  """(x contracting, x batch, W contracting, W batch) dims of a dense site."""
  (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
  if site.param_slots == (1,):
    return lc, lb, rc, rb
  return rc, rb, lc, lb


def dot_general_factors(site: Site, x: chex.Array, delta: chex.Array):
  """x as (B, T, A) and δ as (B, T, C): ∂f/∂W = [x_bᵀ δ_b]_b.

  B are the batch dims shared by x and W (e.g. heads), T the positions (x's
  free dims), A the contracted inputs, C W's free dims (outputs).
  """
  xc, xb, wc, wb = dot_general_dims(site)
  w_is_rhs = site.param_slots == (1,)
  w_aval = site.eqn.invars[site.param_slots[0]].aval
  x_free = [i for i in range(x.ndim) if i not in xc and i not in xb]
  w_free = [i for i in range(w_aval.ndim) if i not in wc and i not in wb]
  bsz = math.prod(x.shape[i] for i in xb)
  t = math.prod(x.shape[i] for i in x_free)
  a = math.prod(x.shape[i] for i in xc)
  c = math.prod(w_aval.shape[i] for i in w_free)
  xs = jnp.transpose(x, (*xb, *x_free, *xc)).reshape(bsz, t, a)
  # dot_general's output is (batch, lhs free, rhs free).
  nb, nx, nw = len(xb), len(x_free), len(w_free)
  if not w_is_rhs:
    delta = jnp.transpose(delta, (*range(nb), *range(nb + nw, nb + nw + nx),
                                  *range(nb, nb + nw)))
  return xs, delta.reshape(bsz, t, c)


def dot_general_sq(site: Site, x: chex.Array, delta: chex.Array) -> chex.Array:
  """Ghost ‖∂f/∂W‖² at ``dot_general(lhs, rhs)`` with W the parameter."""
  return gram_or_outer_sq(*dot_general_factors(site, x, delta))


def _is_embedding_gather(site: Site) -> bool:
  if site.param_slots != (0,) or site.data_slots != (1,):
    return False
  dn = site.eqn.params["dimension_numbers"]
  table = site.eqn.invars[0].aval
  out = site.eqn.outvars[0].aval
  return (table.ndim == 2 and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,)
          and tuple(dn.offset_dims) == (out.ndim - 1,)
          and not dn.operand_batching_dims
          and tuple(site.eqn.params["slice_sizes"]) == (1, table.shape[1]))


class Tokens(NamedTuple):
  """Rows e_{tok_t} of an embedding gradient, kept as indices (T,)."""
  tok: chex.Array
  valid: chex.Array


def _embedding_factors(site: Site, indices: chex.Array, delta: chex.Array
                       ) -> tuple[Tokens, chex.Array]:
  """∂f/∂E = Σ_t e_{tok_t} δ_tᵀ for the lookup E[tok]; δ as (T, width)."""
  vocab, width = site.eqn.invars[0].aval.shape
  tok = indices[..., 0].reshape(-1)
  valid = jnp.ones(tok.shape, bool)
  if site.eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
    valid = (tok >= 0) & (tok < vocab)  # dropped lookups get no gradient
  delta = jnp.where(valid[:, None], _f32(delta).reshape(-1, width), 0.0)
  return Tokens(jnp.clip(tok, 0, vocab - 1), valid), delta


def embedding_sq(site: Site, indices: chex.Array,
                  delta: chex.Array) -> chex.Array:
  """‖∂f/∂E‖² = Σ_{t,t'} [tok_t = tok_t'] δ_t·δ_t'."""
  (tok, _), delta = _embedding_factors(site, indices, delta)
  t = tok.shape[0]
  # Rows of one token add up. Label each position by its token's first
  # position (T² integer compares, cheaper than a sort on CPU for short
  # sequences) or by its run in sorted order, then sum rows per label, O(T d).
  if t <= 512:
    label = jnp.argmax(tok[:, None] == tok[None, :], axis=1)
  else:
    order = jnp.argsort(tok)
    tok, delta = tok[order], delta[order]
    label = jnp.cumsum(jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), (tok[1:] != tok[:-1]).astype(jnp.int32)]))
  rows = jax.ops.segment_sum(delta, label, num_segments=t)
  return jnp.sum(rows * rows)


def conv_sq(site: Site, x: chex.Array, delta: chex.Array) -> chex.Array:
  r"""Ghost ‖∂f/∂K‖² at ``conv_general_dilated(x, K)``.

  The kernel gradient at window offset o and feature group g is X_{o,g}ᵀ Δ_g,
  with X_{o,g} the (dilated, padded) input read at the output positions'
  offset o: a strided slice, so no patches are built (an identity-kernel
  patches convolution costs the layer's FLOPs times the window's size: with
  it the ResNet's ghost pass cost 3.6× its plain gradient on CPU, 1.7×
  without). Then
  ‖∂f/∂K‖² = Σ_g Σ_o ‖X_{o,g}ᵀ Δ_g‖², or in the Gram form
  Σ_g ⟨Σ_o X_{o,g} X_{o,g}ᵀ, Δ_g Δ_gᵀ⟩ where the output positions are few.
  """
  p = site.eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  groups = p["feature_group_count"]
  window = [site.eqn.invars[1].aval.shape[i] for i in rhs_spec[2:]]
  out_size = [delta.shape[i] for i in out_spec[2:]]
  t = delta.shape[out_spec[0]] * math.prod(out_size)  # positions
  a, c = x.shape[lhs_spec[1]] // groups, delta.shape[out_spec[1]] // groups
  size = math.prod(window) * a  # patch features per group
  gram = t * (size + c) <= size * c
  # Each form reads its operands with the axis it contracts minor: features
  # (batch, spatial..., features) for the Gram form, positions (features,
  # batch, spatial...) for the outer product, so that XLA:CPU transposes no
  # slice before its dot. Groups own contiguous features; no group axis when
  # there is one group (a size-1 axis between them costs a transpose too).
  order = lambda s: (s[0], *s[2:], s[1]) if gram else (s[1], s[0], *s[2:])
  first = 1 if gram else 2  # the first spatial axis
  x = _f32(jnp.transpose(x, order(lhs_spec)))
  delta = _f32(jnp.transpose(delta, order(out_spec)))
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * first + [
      (lo, hi, dil - 1) for (lo, hi), dil in zip(p["padding"], p["lhs_dilation"])
  ] + [(0, 0, 0)] * (x.ndim - first - len(window)))
  g = "g" if groups > 1 else ""

  def split(v, features):  # (positions, [g,] f) or ([g,] f, positions)
    if gram:
      return v.reshape((-1, groups, features) if groups > 1 else (-1, features))
    return v.reshape((groups, features, -1) if groups > 1 else (features, -1))

  def read(offset):  # x at the offset, along the first len(offset) spatial axes
    start, limit, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
    for i, (o, r, n, s) in enumerate(zip(offset, p["rhs_dilation"], out_size,
                                          p["window_strides"])):
      start[first + i] = o * r
      limit[first + i], strides[first + i] = o * r + (n - 1) * s + 1, s
    return split(lax.slice(x, start, limit, strides), a)

  if gram:
    kx = sum(jnp.einsum(f"t{g}a,s{g}a->{g}ts", xo, xo, precision=HIGHEST)
             for xo in map(read, itertools.product(*map(range, window))))
    delta = split(delta, c)
    kd = jnp.einsum(f"t{g}c,s{g}c->{g}ts", delta, delta, precision=HIGHEST)
    return jnp.sum(kx * kd)
  # The outer product reads x whole along the last spatial axis and moves δ
  # there instead, to each of that axis's window offsets (dilated by the
  # stride; stacked as features): a k×k window then reads x k times, not k²
  # (every read recomputes x's producer, e.g. BatchNorm → ReLU: those reads
  # were most of the time).
  width, n, r, s = x.shape[-1], out_size[-1], p["rhs_dilation"][-1], \
      p["window_strides"][-1]
  moved = jnp.stack([
      lax.pad(delta, jnp.zeros((), delta.dtype), [(0, 0, 0)] * (delta.ndim - 1)
              + [(o * r, width - o * r - (n - 1) * s - 1, s - 1)])
      for o in range(window[-1])])
  moved = jnp.swapaxes(moved.reshape(window[-1], groups, c, -1), 0, 1)
  moved = split(moved, window[-1] * c)
  total = jnp.zeros((), jnp.float32)
  for xo in map(read, itertools.product(*map(range, window[:-1]))):
    grad = jnp.einsum(f"{g}at,{g}ct->{g}ac", xo, moved, precision=HIGHEST)
    total = total + jnp.sum(grad * grad)
  return total


def site_kernel(site: Site) -> Optional[Callable[[Site, Any, chex.Array], chex.Array]]:
  """The kernel that applies at ``site`` (:func:`dot_general_sq`,
  :func:`conv_sq` or :func:`embedding_sq`), or None."""
  name = site.eqn.primitive.name
  if (name == "conv_general_dilated" and site.param_slots == (1,)
      and site.data_slots == (0,) and site.eqn.params["batch_group_count"] == 1):
    return conv_sq
  if name == "dot_general" and len(site.param_slots) == 1 \
      and len(site.data_slots) == 1:
    return dot_general_sq
  if name == "gather" and _is_embedding_gather(site):
    return embedding_sq
  return None


def site_sq(site: Site, data: Sequence[Any], delta: chex.Array) -> chex.Array:
  """‖∂f/∂W‖² at a site :func:`site_kernel` finds a kernel for, for one example."""
  kernel = site_kernel(site)
  assert kernel is not None  # the plan routes only such sites here
  return kernel(site, data[0], delta)


def _shared_factors(site: Site, layout: int, data: Sequence[Any],
                    delta: chex.Array):
  """A site's ∂f/∂W as Σ_t r_t c_tᵀ in the 2-D leaf's own axes: (r, c)."""
  if site_kernel(site) is embedding_sq:
    return _embedding_factors(site, data[0], delta)
  xs, ds = dot_general_factors(site, data[0], delta)
  xs, ds = _f32(xs[0]), _f32(ds[0])
  (w_contracted,) = dot_general_dims(site)[2]
  # The leaf's axis 0 is the site operand's axis `layout`.
  return (xs, ds) if w_contracted == layout else (ds, xs)


def _factor_gram(a, b) -> chex.Array:
  """[⟨a_t, b_s⟩]_{t,s} for factors given densely (T, D) or as Tokens."""
  if isinstance(a, Tokens) and isinstance(b, Tokens):
    return ((a.tok[:, None] == b.tok[None, :]) & a.valid[:, None]
            & b.valid[None, :]).astype(jnp.float32)
  if isinstance(b, Tokens):
    return _factor_gram(b, a).T
  if isinstance(a, Tokens):  # ⟨e_tok, b_s⟩ = b_s[tok]
    return jnp.where(a.valid[:, None], b[:, a.tok].T, 0.0)
  return jnp.einsum("td,sd->ts", a, b, precision=HIGHEST)


def shared_sq(sites: Sequence[Site], group: tuple[int, ...],
               layouts: tuple[int, ...], data: Sequence[Any],
               deltas: Sequence[Any]) -> chex.Array:
  """‖Σ_s Σ_t r_st c_stᵀ‖² for a 2-D weight used at several sites (tied):
  Σ over pairs of sites of Σ_{t,t'} ⟨r_st, r_s't'⟩ ⟨c_st, c_s't'⟩."""
  factors = [_shared_factors(sites[s], layout, data[s], deltas[s][0])
             for s, layout in zip(group, layouts)]
  return sum(jnp.sum(_factor_gram(ra, rb) * _factor_gram(ca, cb))
             for ra, ca in factors for rb, cb in factors)
