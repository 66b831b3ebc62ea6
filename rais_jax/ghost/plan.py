"""The plan: which sites a kernel covers and which are pulled back.

Per parameter leaf (or disjoint part of one, e.g. the layers of an unrolled
scan): used by exactly one site a kernel handles, through a norm-preserving
map (transpose, reshape, cast) → that kernel; a 2-D weight used at several
such sites → one joint Gram (:func:`rais_jax.ghost.kernels.shared_sq`) where
cheaper than the per-example gradient; otherwise (biases and scales broadcast
into the data, parameters combined with each other, higher-order equations)
→ the local per-example gradient is pulled back
(:mod:`rais_jax.ghost.pullback`).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence, cast

import jax.extend as jex

from rais_jax.ghost.kernels import (dot_general_dims, dot_general_sq, embedding_sq,
                                    site_kernel)
from rais_jax.ghost.walker import MAX_UNROLL, Site


def _positions(site: Site) -> int:
  """T of a site that qualifies for the shared (tied) Gram form, else 0."""
  kernel = site_kernel(site)
  if kernel is embedding_sq:
    return math.prod(site.eqn.invars[1].aval.shape[:-1])
  if kernel is not dot_general_sq:
    return 0
  xc, xb, wc, wb = dot_general_dims(site)
  x = site.eqn.invars[site.data_slots[0]].aval
  if xb or wb or len(wc) != 1:
    return 0
  return math.prod(x.shape) // x.shape[xc[0]]


class Plan(NamedTuple):
  ghost: tuple[int, ...]  # sites whose single parameter operand is ghosted
  # 2-D leaves used at several sites (tied): (sites, each one's layout).
  shared: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
  pulled: tuple[tuple[int, int], ...]  # (site, operand) formed and pulled back


def make_plan(sites: Sequence[Site]) -> Plan:
  """How each site's contribution to the norms is computed."""
  part_uses: dict[tuple[int, tuple], list[tuple[int, int]]] = {}
  for s, site in enumerate(sites):
    for j, slot in enumerate(site.param_slots):
      tag = site.in_tags[slot]
      for leaf in tag.leaves:
        part_uses.setdefault((leaf, tag.part), []).append((s, j))
  # Disjoint parts of a leaf (e.g. the layers of an unrolled scan) have
  # orthogonal gradients, so each is a unit of its own; if one part contains
  # another, the whole leaf is one unit.
  parts: dict[int, list[tuple]] = {}
  for leaf, part in part_uses:
    parts.setdefault(leaf, []).append(part)
  uses: dict[tuple[int, tuple], list[tuple[int, int]]] = {}
  for (leaf, part), unit_uses in part_uses.items():
    nested = any(a != b and a[:len(b)] == b for a in parts[leaf]
                 for b in parts[leaf])
    uses.setdefault((leaf, () if nested else part), []).extend(unit_uses)
  ghost, shared, covered = [], [], set()
  for leaf_uses in uses.values():
    tags = [sites[s].in_tags[sites[s].param_slots[j]] for s, j in leaf_uses]
    if not all(t.iso and site_kernel(sites[s]) for t, (s, _) in
               zip(tags, leaf_uses)):
      continue
    if len(leaf_uses) == 1:
      ghost.append(leaf_uses[0][0])
      covered.add(leaf_uses[0][0])
      continue
    group = tuple(s for s, _ in leaf_uses)
    layouts = tuple(t.layout for t in tags)
    embedding_ok = all(l == 0 for s, l in zip(group, layouts)
                       if site_kernel(sites[s]) is embedding_sq)
    if (None in layouts or len({t.part for t in tags}) > 1 or not embedding_ok
        or not all(_positions(sites[s]) for s in group)):
      continue
    positions = sum(_positions(sites[s]) for s in group)
    rows, cols = sites[group[0]].eqn.invars[
        sites[group[0]].param_slots[0]].aval.shape
    if positions * (rows + cols) <= rows * cols:  # the Gram form is cheaper
      shared.append((group, cast(tuple[int, ...], layouts)))  # no None: checked
      covered.update(group)
  pulled = tuple((s, j) for s, site in enumerate(sites) if s not in covered
                 for j in range(len(site.param_slots)))
  return Plan(tuple(sorted(ghost)), tuple(shared), pulled)


def warn_higher_order(sites: Sequence[Site], plan: Plan,
                      names: Sequence[str]) -> None:
  """Names the parameters whose per-example gradients a higher-order
  equation forces to be formed (``cond``, custom JVP, a shared-weight scan)."""
  by_prim: dict[str, set[str]] = {}
  for s, _ in plan.pulled:
    site = sites[s]
    if any(True for _ in jex.core.jaxprs_in_params(site.eqn.params)):
      leaves = frozenset().union(*(site.in_tags[i].leaves
                                   for i in site.param_slots))
      by_prim.setdefault(site.eqn.primitive.name, set()).update(
          names[i] for i in leaves)
  for prim, leaf_names in sorted(by_prim.items()):
    warnings.warn(
        f"ghost norms: parameters {sorted(leaf_names)} are used inside "
        f"`{prim}`; their per-example gradients are computed by vmap over that "
        "operation's VJP (exact, but memory m × their size). Ghost norms see "
        "inside jit, closed_call, remat and scans of at most "
        f"{MAX_UNROLL} steps over stacked (not shared) weights; where this "
        "is slower than per-example gradients, method='auto' (or "
        "exact_method='auto') measures and takes the faster.", stacklevel=4)
