"""(PT): learning the uncertainty set, all in one place.

* :mod:`~rais_jax.pt.solver`: the convex problem (PT) and its projected-gradient solver;
* :mod:`~rais_jax.pt.snapshot`: the snapshot of D in the sampler state, and
  the delivery of a result;
* :mod:`~rais_jax.pt.periodic`: the period and delay (:class:`PeriodicSolve`),
  and the per-step API's hand-off;
* :mod:`~rais_jax.pt.service`: solves on a host thread (the fast path's
  service, the per-step API's callbacks);
* :mod:`~rais_jax.pt.handoff`: the fast path's host side.
"""

from rais_jax.pt.periodic import PeriodicSolve
from rais_jax.pt.solver import PTInfo, pt_constraint, solve_pt

__all__ = ["PTInfo", "PeriodicSolve", "pt_constraint", "solve_pt"]
