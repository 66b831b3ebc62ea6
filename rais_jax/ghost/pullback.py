"""The pull-back: per-example gradients of the sites no kernel covers.

Site s's local per-example gradient G_{s,k} (w.r.t. its parameter operands,
by ``vmap`` of that one equation's VJP: cheap for element-wise uses) is
pulled back through h, the parameter-only computation that maps the leaves
to those operands; all uses of a leaf are summed before its norm is taken,
so shared weights are exact: Σ over the leaves of ‖J_hᵀ Σ_s G_{s,k}‖².
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp

from rais_jax.ghost.walker import Site, bind


def _site_inputs(site: Site, params: Sequence[Any], data: Sequence[Any],
                 fixed: Sequence[Any]) -> list[Any]:
  vals = [v.val if isinstance(v, jex.core.Literal) else None
          for v in site.eqn.invars]
  for slots, xs in ((site.param_slots, params), (site.data_slots, data),
                    (site.fixed_slots, fixed)):
    for i, x in zip(slots, xs):
      vals[i] = x
  return vals


def local_param_grads(site: Site, params, data, fixed, deltas) -> list[Any]:
  """One example's gradient w.r.t. a site's parameter operands (its VJP)."""
  def local(p):
    outs = bind(site.eqn, _site_inputs(site, p, data, fixed))
    return [o for o, keep in zip(outs, site.perturbed) if keep]
  _, vjp = jax.vjp(local, list(params))
  return vjp([d for d, keep in zip(deltas, site.perturbed) if keep])[0]


def pulled_back_sq(sites, pulled, site_params, p_leaves, data_ops, fixed_ops,
                    deltas) -> chex.Array:
  """Σ over the leaves involved of ‖J_hᵀ Σ_s G_{s,k}‖², per example k.

  G_{s,k} is site s's local per-example gradient w.r.t. its parameter operands
  and h maps the parameter leaves to those operands; all uses of a leaf are
  summed before the norm, so tied weights are exact.
  """
  involved = sorted(frozenset().union(*(
      sites[s].in_tags[sites[s].param_slots[j]].leaves for s, j in pulled)))

  def operands_of(sub):
    pl = list(p_leaves)
    for i, x in zip(involved, sub):
      pl[i] = x
    ops = site_params(pl)
    return [ops[s][j] for s, j in pulled]

  values, pull_back = jax.vjp(operands_of, [p_leaves[i] for i in involved])
  # `pulled` lists every operand of each of its sites, in order.
  operands: dict[int, list[Any]] = {}
  for (s, _), value in zip(pulled, values):
    operands.setdefault(s, []).append(value)

  def per_example(data_k, deltas_k):
    local = {s: local_param_grads(sites[s], ops, data_k[s], fixed_ops[s],
                                   deltas_k[s])
             for s, ops in operands.items()}
    (grads,) = pull_back([local[s][j] for s, j in pulled])
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads)

  return jax.vmap(per_example)(data_ops, deltas)
