"""U-SGD, RAIS-SGD, O-SGD and the methods users would pick instead, trained
side by side, and how much sooner each reaches U-SGD's final training loss.

Methods (``--methods``):

* ``usgd``: uniform sampling, the plain learning rate;
* ``rais``: RAIS-SGD (norms as ``norms`` says; ``rais-exact`` and
  ``rais-proxy`` fix them); ``osgd``: the O-SGD oracle (p ∝ all n exact
  norms, refreshed every ``oracle_period`` steps);
* ``naive``: p ∝ the last measured gradient norm of each example, RAIS's
  floor, gain ratio and schedule (the ablation of the robust set);
* ``loss-is``: p ∝ the last loss, unbiased weights, the plain learning rate
  (Katharopoulos & Fleuret, 2018, without presampling);
* ``selective-backprop``: backpropagate the high-loss examples among
  (β + 1) m uniform candidates (Jiang et al., 2019), no reweighting;
* ``infobatch``: prune below-mean-loss examples each epoch and up-weight the
  kept ones, full data for the last epochs (Qin et al., ICLR 2024).

All share the fast step (:func:`rais_jax.make_runner`), the model and its
initialisation (per seed), the base learning-rate schedule (the methods that
raise the learning rate by the gain ratio, RAIS, O-SGD and naive, index it by
equivalent iterations τ and stop when it is spent, see
:func:`rais_jax.rais_sgd`; InfoBatch indexes it by data epochs), the batch
size, the keys and the evaluation points (every epoch). At each point a run
records the training loss over the whole training set (uniform weights), test
loss and accuracy, the wall-clock training time so far (evaluation excluded),
epochs equivalent τ/(n/m) and the mean gain ratio of the epoch's steps; an
"epoch" is n/m steps of m backpropagated examples (an InfoBatch epoch has
fewer steps; a Selective-Backprop step forwards (β + 1) m candidates).

With ``budgets`` and ``lrs`` (``--budgets``, ``--lrs``) U-SGD also runs once
per (budget, learning rate, seed) with its schedule fully decayed over that
shorter budget, and every other method once per learning rate: the
budget-matched frontier and speed-ups of :mod:`rais_jax.experiments.frontier`,
by which the methods are ranked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import subprocess
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import rais_jax as rj
from rais_jax.experiments import data as data_lib
from rais_jax.experiments import frontier
from rais_jax.experiments.models import MODELS, functional, make_model, stateful
from rais_jax.step import NORMS

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  dataset: str = "mnist1d"
  model: str = "mlp"
  methods: tuple[str, ...] = ("usgd", "rais", "osgd")
  epochs: int = 30
  seeds: tuple[int, ...] = (0, 1, 2)
  batch_size: int = 64
  lr: float = 0.05
  lr_schedule: str = "cosine"
  momentum: float = 0.9
  norms: str = "auto"  # how RAIS measures u_k: "auto", "exact" or "proxy"
  exact_method: str = "ghost"  # exact norms by "ghost", "vmap" or "auto" (measured)
  oracle_period: int = 10  # O-SGD refreshes all n exact norms every k steps
  r_max: Optional[float] = None  # upper clip of RAIS's and O-SGD's gain ratio (default m)
  # The uniform floor ε of RAIS, naive and loss-is (default: each sampler's
  # own, 1e-3; O-SGD keeps its 0.3).
  floor: Optional[float] = None
  # K of the fast path: the largest divisor of the steps per epoch up to this
  # (RAIS: also up to half its (PT) period; O-SGD: up to the oracle period,
  # so that it refreshes on schedule).
  block_size: int = 32
  sb_beta: float = 1.0  # Selective-Backprop's selectivity β
  infobatch_ratio: float = 0.5  # InfoBatch's prune ratio r
  infobatch_delta: float = 0.875  # InfoBatch's annealing δ
  hidden: tuple[int, ...] = (256, 256)
  num_samples: int = 10_000  # MNIST-1D only
  data_dir: Optional[str] = None
  # Random crop (padding 2) and horizontal flip of every training example,
  # on device (images only).
  augment: bool = False
  dropout: float = 0.0  # dropout rate of the MLP's or the ResNet's hidden layers
  # Compile each block's steps unrolled (make_runner(unroll=True)): for
  # convolutional models on CPU, where XLA runs convolutions inside a loop
  # several times slower (jax-ml/jax#12868).
  unroll: bool = False
  # The budget-matched frontier (see rais_jax.experiments.frontier): U-SGD
  # runs once per budget (a fraction of ``epochs``; 1 is always added) and
  # learning rate, its schedule fully decayed over that budget; every other
  # method once per learning rate. None: U-SGD's full-budget run alone.
  budgets: Optional[tuple[float, ...]] = None
  lrs: Optional[tuple[float, ...]] = None  # base learning rates (``lr`` is added)

  def validate(self, known: Sequence[str] = ()) -> None:
    """One clear error per bad field; ``known``: the method names on offer
    (default :data:`METHODS`)."""
    known = tuple(known) or tuple(METHODS)
    bad = [m for m in self.methods if m not in known]
    if bad or not self.methods:
      raise ValueError(f"methods must be a non-empty subset of {known}; got "
                       f"{list(self.methods)}.")
    if self.lr_schedule not in SCHEDULES:
      raise ValueError(f"lr_schedule must be one of {SCHEDULES}; got "
                       f"{self.lr_schedule!r}.")
    if self.norms not in NORMS:
      raise ValueError(f"norms must be one of {NORMS}; got {self.norms!r}.")
    if self.exact_method not in rj.norms.METHODS:
      raise ValueError(f"exact_method must be one of {rj.norms.METHODS}; got "
                       f"{self.exact_method!r}.")
    for name in ("epochs", "batch_size", "oracle_period", "block_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be ≥ 1; got {getattr(self, name)}.")
    if not self.seeds:
      raise ValueError("seeds must not be empty.")
    if self.r_max is not None and self.r_max < 1:
      raise ValueError(f"r_max must be ≥ 1; got {self.r_max}.")
    if self.lr <= 0:
      raise ValueError(f"lr must be > 0; got {self.lr}.")
    if self.floor is not None and not 0 < self.floor <= 1:
      raise ValueError(f"floor must lie in (0, 1]; got {self.floor}.")
    if self.sb_beta <= 0:
      raise ValueError(f"sb_beta must be > 0; got {self.sb_beta}.")
    if not 0 <= self.infobatch_ratio < 1:
      raise ValueError(f"infobatch_ratio must lie in [0, 1); got {self.infobatch_ratio}.")
    if not 0 <= self.infobatch_delta <= 1:
      raise ValueError(f"infobatch_delta must lie in [0, 1]; got {self.infobatch_delta}.")
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}; got {self.model!r}.")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"dropout must lie in [0, 1); got {self.dropout}.")
    if self.dropout and self.model == "cnn":
      raise ValueError("the cnn model has no dropout; use mlp or resnet.")
    if self.budgets is not None:
      if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
        raise ValueError("budgets must be a non-empty list of fractions of "
                         f"epochs in (0, 1]; got {list(self.budgets)}.")
      if "usgd" not in self.methods:
        raise ValueError("budgets are U-SGD's: add usgd to methods.")
    if self.lrs is not None and (not self.lrs or any(not lr > 0 for lr in self.lrs)):
      raise ValueError("lrs must be a non-empty list of learning rates > 0; got "
                       f"{list(self.lrs)}.")
    if self.augment and self.dataset == "mnist1d":
      raise ValueError("augment crops and flips images; mnist1d holds 1-D "
                       "signals. Use it with fashion-mnist or an image data set.")

  @property
  def stateful(self) -> bool:
    """The model has state or randomness (BatchNorm, dropout)."""
    return self.model == "resnet" or self.dropout > 0

  @property
  def frontier_budgets(self) -> tuple[float, ...]:
    """U-SGD's budgets, ascending, with the full one (1) last."""
    return tuple(sorted(set(self.budgets or ()) | {1.0}))

  @property
  def frontier_lrs(self) -> tuple[float, ...]:
    """The learning rates of the frontier, ``lr`` first."""
    return tuple(dict.fromkeys((self.lr, *(self.lrs or ()))))


def augmentation(config: CompareConfig) -> Optional[rj.augment.Augment]:
  """Random crop (padding 2) then horizontal flip, if ``config.augment``."""
  if not config.augment:
    return None
  return rj.augment.chain(rj.augment.random_crop(2), rj.augment.horizontal_flip())


def schedule(config: CompareConfig, total_steps: int) -> optax.Schedule:
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total_steps)
  if config.lr_schedule == "linear":
    return optax.linear_schedule(config.lr, 0.0, total_steps)
  return optax.constant_schedule(config.lr)


# A method of the comparison: (training labels, number of classes, config)
# -> (its sampler, how it measures norms: one of NORMS or None).
MethodFactory = Callable[[np.ndarray, int, "CompareConfig"],
                         tuple[rj.Sampler, Optional[str]]]


def _floor(config: CompareConfig) -> dict[str, Any]:
  return {} if config.floor is None else {"floor": config.floor}


def _rais(norms: Optional[str] = None) -> MethodFactory:
  """RAIS with these norms (None: ``config.norms``)."""
  return lambda labels, classes, config: (rj.rais_sampler(
      rj.default_features(labels, classes), batch_size=config.batch_size,
      r_max=config.r_max, **_floor(config)), norms or config.norms)


METHODS: dict[str, MethodFactory] = {
    "usgd": lambda labels, classes, config: (
        rj.uniform_sampler(len(labels), batch_size=config.batch_size), None),
    "rais": _rais(),
    # RAIS with proxy or exact norms whatever --norms says: beside "rais" in
    # one run.
    "rais-proxy": _rais("proxy"),
    "rais-exact": _rais("exact"),
    # The oracle's own steps measure exact norms (ghost): its r is exact.
    "osgd": lambda labels, classes, config: (rj.oracle_sampler(
        len(labels), batch_size=config.batch_size, r_max=config.r_max), "exact"),
    "naive": lambda labels, classes, config: (rj.baselines.naive_sampler(
        len(labels), batch_size=config.batch_size, r_max=config.r_max,
        **_floor(config)), config.norms),
    "loss-is": lambda labels, classes, config: (rj.baselines.loss_sampler(
        len(labels), batch_size=config.batch_size, **_floor(config)), None),
    "selective-backprop": lambda labels, classes, config: (
        rj.baselines.selective_backprop(len(labels), batch_size=config.batch_size,
                                        beta=config.sb_beta), None),
    "infobatch": lambda labels, classes, config: (rj.baselines.infobatch(
        len(labels), batch_size=config.batch_size, num_epochs=config.epochs,
        prune_ratio=config.infobatch_ratio, anneal=config.infobatch_delta), None),
}


def block_size(steps_per_epoch: int, limit: int) -> int:
  """The largest divisor of ``steps_per_epoch`` that is at most ``limit``."""
  return max(k for k in range(1, min(limit, steps_per_epoch) + 1)
             if steps_per_epoch % k == 0)


class MethodRunner:
  """One method's fast-path runner (compiled once) and evaluator, reused by seeds."""

  def __init__(self, method: str, factory: MethodFactory, config: CompareConfig,
               train, test, labels, classes: int, model_fn, *, budget: float = 1.0):
    """``model_fn``: a plain model function or a :class:`rais_jax.StatefulModel`;
    ``budget``: the fraction of ``config.epochs`` the schedule decays over
    (rounded to whole blocks)."""
    self.method, self.train, self.test = method, train, test
    n, m = len(labels), config.batch_size
    if m > n:
      raise ValueError(f"batch_size {m} exceeds the {n} training examples.")
    self.steps_per_epoch = n // m
    self.sampler, norms = factory(labels, classes, config)
    limit = config.block_size
    if self.sampler.refresh is not None:  # refresh on schedule
      limit = min(limit, config.oracle_period)
    if self.sampler.pt is not None:  # blocks of at most half a (PT) period (see make_runner)
      limit = min(limit, max(1, self.sampler.pt.period // 2))
    self.block_size = k = block_size(self.steps_per_epoch, limit)
    # The budget in steps (U-SGD's; τ for the methods that raise the rate).
    self.budget_steps = max(k, round(budget * config.epochs * self.steps_per_epoch / k) * k)
    self.schedule = schedule(config, self.budget_steps)
    self.optimizer = rj.rais_sgd(self.schedule, momentum=config.momentum)
    head = rj.softmax_cross_entropy_head()
    self.runner = rj.make_runner(model_fn, head, self.optimizer, self.sampler,
                                 norms=norms,
                                 exact_method=config.exact_method,
                                 block_size=self.block_size,
                                 oracle_period=config.oracle_period,
                                 augment=augmentation(config), unroll=config.unroll)
    # In inference mode (BatchNorm's running averages, no dropout), on the
    # training set as given (not augmented).
    self.evaluate = jax.jit(lambda p, s, d: rj.evaluate(rj.inference(model_fn, s),
                                                        head, p, d))
    self.n, self.m = n, m
    self.compiled = False

  @property
  def budget_epochs(self) -> float:
    return self.budget_steps / self.steps_per_epoch

  def point(self, state, epoch: float, wall: float, r: float) -> dict:
    tr = self.evaluate(state.params, state.model_state, self.train)
    te = self.evaluate(state.params, state.model_state, self.test)
    diag = getattr(state.sampler, "diagnostics", None)
    count = lambda name: 0 if diag is None else int(getattr(diag, name))
    # Selective-Backprop's and InfoBatch's own counters.
    extra = {name: int(getattr(state.sampler, name)) for name in
             ("forwarded", "backpropagated", "pruned", "nonfinite_losses")
             if hasattr(state.sampler, name)}
    return extra | {
        "epoch": epoch, "wall_clock_s": wall,
        "epochs_equivalent": float(rj.epochs_equivalent(state.opt_state, self.m,
                                                        self.n)),
        "train_loss": float(tr["loss"]), "train_accuracy": float(tr["accuracy"]),
        "test_loss": float(te["loss"]),
        "test_accuracy": float(te["accuracy"]), "gain_ratio": r,
        "pt_solves": count("pt_solves"), "pt_failures": count("pt_failures"),
        "nonfinite_norms": count("nonfinite_norms"),
        "skipped_steps": int(state.skipped_steps),
    }

  def _epoch(self, state, key, tau: float, gain: float, steps: int):
    """One epoch of steps; RAIS and O-SGD stop inside it once τ reaches the
    budget (checked block by block only near the end, where it can).
    Skipped steps are recorded per point (``skipped_steps``), not warned of
    epoch after epoch."""
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", r".* steps (was|were) skipped",
                              RuntimeWarning)
      return self._steps_of_epoch(state, key, tau, gain, steps)

  def _steps_of_epoch(self, state, key, tau: float, gain: float, steps: int):
    """(state, the gain ratios of its steps, one array per run); ``steps``:
    the epoch's (fewer in a budget's last, partial epoch)."""
    budget = self.budget_steps
    if not self.sampler.boosts_lr or budget - tau > 2 * max(gain, 1.0):
      if steps == self.steps_per_epoch:
        state, metrics = self.runner.run_epoch(state, key, self.train)
      else:
        state, metrics = self.runner.run(state, key, self.train, steps)
      return state, [metrics.gain_ratio]
    k, ratios = self.runner.block_size, []
    for _ in range(steps // k):
      state, m = self.runner.run(state, key, self.train, k)
      # Joined after the clock stops: an eager concatenation compiles for
      # every new number of parts.
      ratios.append(m.gain_ratio)
      if self._tau(state) >= budget:
        break
    return state, ratios

  @staticmethod
  def _tau(state) -> float:
    return float(rj.equivalent_iterations(state.opt_state))

  def run(self, params, seed: int, *, quiet: bool = False,
          model_state: Any = (), curve: bool = True) -> dict:
    """Trains one seed. The methods that raise the learning rate by the
    gain ratio (RAIS, O-SGD, naive) run until their schedule's budget
    (:attr:`budget_steps`) *equivalent* is spent (τ = U-SGD's number of steps;
    no steps at the schedule's final rate after it), or that many real steps,
    whichever comes first; the others run the budget's steps. ``curve``:
    evaluate every epoch (else only at the end: a frontier's extra runs)."""
    key = jax.random.key(seed)
    if not self.compiled:
      # Compile before the clock starts: every program of the run (the
      # block, the (PT) delivery and submission, the solver), then one
      # epoch whose result is dropped (compiling alone left the first timed
      # epoch measurably slower).
      self.runner.warm_up(params, self.train, model_state)
      warm = self.runner.init(params, model_state)
      jax.block_until_ready(self.runner.run_epoch(warm, key, self.train))
      if self.budget_steps % self.steps_per_epoch:  # a budget's last, partial epoch
        warm = self.runner.init(params, model_state)
        jax.block_until_ready(self.runner.run(
            warm, key, self.train, self.budget_steps % self.steps_per_epoch))
      self.runner.close()
      self.compiled = True
    budget, per_epoch = self.budget_steps, self.steps_per_epoch
    state = self.runner.init(params, model_state)
    points = [self.point(state, 0, 0.0, 1.0)] if curve else []
    wall, gain, schedule_end = 0.0, 0.0, None
    # disable=None: a bar on a terminal only, never in a log file.
    epochs = -(-budget // per_epoch)
    bar = tqdm(range(1, epochs + 1), desc=f"{self.method} seed {seed}",
               leave=False, disable=True if quiet else None)
    # τ is read between epochs, off the clock (each host read waits for the
    # device).
    tau, done = self._tau(state), 0
    for e in bar:
      start = time.perf_counter()
      state, ratios = self._epoch(state, key, tau, gain, min(per_epoch, budget - done))
      jax.block_until_ready(state)
      wall += time.perf_counter() - start
      previous, tau = tau, self._tau(state)
      gain, done = tau - previous, int(state.step)
      epoch = done / per_epoch
      epoch_ratios = np.asarray(jnp.concatenate(ratios), np.float64)
      last = self.sampler.boosts_lr and tau >= budget
      if curve or last or e == epochs:
        points.append(self.point(state, epoch, wall, float(epoch_ratios.mean())))
        bar.set_postfix(loss=f"{points[-1]['train_loss']:.4f}",
                        r=f"{points[-1]['gain_ratio']:.2f}")
      if last:
        schedule_end = epoch
        break
    self.runner.close()
    steps = int(state.step)
    run = {"seed": seed, "curve": points, "block_size": self.block_size,
           "schedule_end_epoch": schedule_end, "steps": steps,
           "ms_per_step": 1e3 * wall / max(steps, 1),
           "budget_epochs": self.budget_epochs,
           # The base rate of the last step (τ before it), and the one the
           # next step would take: the schedule's end (0 for cosine and
           # linear) once it is fully decayed.
           "last_step_lr": float(self.schedule(tau - epoch_ratios[-1])),
           "final_lr": float(self.schedule(tau))}
    if schedule_end is not None:
      # Steps that started with τ at or past the budget (the stop is checked
      # block by block: at most K − 1), from the last epoch's ratios.
      tau_before = previous + np.concatenate([[0.0], np.cumsum(epoch_ratios)[:-1]])
      run["steps_after_budget"] = int(np.sum(tau_before >= budget - 1e-6))
    if self.sampler.pt is not None:  # the learned uncertainty set
      run["c"] = np.asarray(state.sampler.c).tolist()
      run["d"] = np.asarray(state.sampler.d).tolist()
      run["feature_names"] = list(self.sampler.feature_names)
    return run


def time_to_target(curve: Sequence[dict], target: float, key: str
                   ) -> Optional[float]:
  """``key`` at the first point whose train_loss ≤ target (None if none)."""
  for point in curve:
    if point["train_loss"] <= target:
      return point[key]
  return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  """a / b, or None if either is missing (or b is 0)."""
  return None if a is None or not b else a / b


def _stats(values: Sequence[Optional[float]], *, reached: bool = True) -> dict:
  """Per-seed values with their median, min and max (None: never reached)."""
  got = [v for v in values if v is not None]
  out: dict[str, Any] = {"per_seed": list(values)}
  if reached:
    out["reached"] = f"{len(got)}/{len(values)}"
  if got:
    out.update(median=statistics.median(got), min=min(got), max=max(got))
  return out


def _at(curve: Sequence[dict], key: str, limit: float) -> dict:
  """The last point of ``curve`` whose ``key`` ≤ limit (the first if none)."""
  points = [p for p in curve if p[key] <= limit + 1e-9]
  return points[-1] if points else curve[0]


def summarise(runs: dict[str, dict[str, dict]],
              unbiased: Optional[dict[str, bool]] = None,
              records: Optional[Sequence[dict]] = None,
              lr: Optional[float] = None) -> dict:
  """Per method, when it first reaches U-SGD's final training loss (per seed)
  and the speed-ups vs U-SGD, the real epochs it ran, and training loss and
  test accuracy at equal wall-clock (the method given U-SGD's total training
  time) and at equal epochs (U-SGD at the method's last epoch): median, min
  and max over seeds; and the budget-matched speed-ups
  (:mod:`~rais_jax.experiments.frontier`) against U-SGD's frontier of
  ``records`` (default: the runs' own, U-SGD's full budget alone), at
  ``lr`` (the main runs') and at every learning rate of the records."""
  if "usgd" not in runs:
    return {"note": "no U-SGD runs: nothing to compare against."}
  if records is None:
    lr = 0.0 if lr is None else lr
    records = [frontier.record(method, int(s), lr,
                               run.get("budget_epochs", run["curve"][-1]["epoch"]), run)
               for method, by_seed in runs.items() for s, run in by_seed.items()]
  lrs = sorted({r["lr"] for r in records})
  lr = lrs[0] if lr is None else lr
  budget_matched = {str(x): frontier.summarise(records, x) for x in lrs}
  seeds = list(runs["usgd"])
  usgd_final = {s: runs["usgd"][s]["curve"][-1] for s in seeds}
  targets = {s: usgd_final[s]["train_loss"] for s in seeds}
  summary: dict[str, Any] = {"target": "U-SGD's final training loss, per seed",
             "seeds": [int(s) for s in seeds],
             "targets": [targets[s] for s in seeds], "methods": {}}
  base = {key: {s: time_to_target(runs["usgd"][s]["curve"], targets[s], key)
                for s in seeds} for key in ("wall_clock_s", "epoch")}
  for method, by_seed in runs.items():
    entry = {}
    for key in ("wall_clock_s", "epoch"):
      reach = [time_to_target(by_seed[s]["curve"], targets[s], key)
               if s in by_seed else None for s in seeds]
      speedup = [_ratio(base[key][s], r) for s, r in zip(seeds, reach)]
      entry[key] = _stats(reach)
      entry[f"speedup_{key}"] = _stats(speedup)
    ran = [s for s in seeds if s in by_seed]
    final = [by_seed[s]["curve"][-1] for s in ran]
    entry["epochs_run"] = _stats([p["epoch"] for p in final], reached=False)
    entry["final_train_loss"] = _stats([p["train_loss"] for p in final],
                                       reached=False)
    entry["final_test_accuracy"] = _stats([p["test_accuracy"] for p in final],
                                          reached=False)
    equal_wall = [_at(by_seed[s]["curve"], "wall_clock_s",
                      usgd_final[s]["wall_clock_s"]) for s in ran]
    # U-SGD at this method's last epoch (rounded up: U-SGD evaluates whole epochs).
    usgd_equal = [_at(runs["usgd"][s]["curve"], "epoch", math.ceil(p["epoch"] - 1e-9))
                  for s, p in zip(ran, final)]
    for name, points in (("at_usgd_wall_clock", equal_wall),
                         ("usgd_at_equal_epochs", usgd_equal)):
      entry[name] = {key: _stats([p[key] for p in points], reached=False)
                     for key in ("train_loss", "test_accuracy")}
    if all("ms_per_step" in by_seed[s] for s in ran):
      entry["ms_per_step"] = _stats([by_seed[s]["ms_per_step"] for s in ran],
                                    reached=False)
    entry["budget_matched_speedup"] = budget_matched[str(lr)].get(method, {})
    summary["methods"][method] = entry
  summary["frontier"] = {
      "lr": lr, "lrs": lrs,
      "usgd_budgets_epochs": sorted({r["budget_epochs"] for r in records
                                     if r["method"] == "usgd"}),
      "budget_matched_speedup_by_lr": budget_matched}
  summary["ranking"] = ranking(summary["methods"], unbiased)
  return summary


def ranking(methods: dict[str, dict], unbiased: Optional[dict[str, bool]] = None
            ) -> dict[str, list[str]]:
  """Methods ordered by their budget-matched speed-up on training loss
  (median over seeds, highest first; ties cut by the one on test accuracy,
  then by name; no value last: see :func:`frontier.rank`), the same among
  the unbiased methods only, and by median final test accuracy (highest
  first)."""
  def accuracy(name):
    return -methods[name]["final_test_accuracy"].get("median", -math.inf)
  speedups = {m: e.get("budget_matched_speedup", {}) for m, e in methods.items()}
  by_speedup = frontier.rank(speedups, list(methods))
  return {"budget_matched_speedup": by_speedup,
          "budget_matched_speedup_unbiased": [
              m for m in by_speedup if unbiased is None or unbiased.get(m, True)],
          "final_test_accuracy": sorted(methods, key=accuracy)}


def environment() -> dict:
  """Versions, backend and the rais-jax git commit (None outside a checkout)."""
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent,
        capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"rais_jax": rj.__version__, "git_commit": commit, "jax": jax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}


def run_compare(config: CompareConfig, out: Optional[str | pathlib.Path] = None,
                *, plots: bool = True, quiet: bool = False,
                methods: Optional[dict[str, MethodFactory]] = None) -> dict:
  """Runs every method for every seed; writes ``out/results.json`` and plots.

  ``methods``: more methods by name (a :data:`MethodFactory` each), beside
  :data:`METHODS`; ``config.methods`` picks among both. Progress bars show on
  a terminal only; ``quiet`` also drops them there and the line printed per
  run."""
  factories = METHODS | dict(methods or {})
  config.validate(known=tuple(factories))
  raw = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                              num_samples=config.num_samples)
  classes = data_lib.num_classes(raw)
  train_set = {"x": jnp.asarray(raw["x_train"]), "label": jnp.asarray(raw["y_train"])}
  test = {"x": jnp.asarray(raw["x_test"]), "label": jnp.asarray(raw["y_test"])}
  input_shape = raw["x_train"].shape[1:]
  # One model per seed (its initialisation); all share one apply function.
  split = stateful if config.stateful else lambda module: (*functional(module), ())
  models = {s: split(make_model(config.model, input_shape, classes,
                                hidden=config.hidden, dropout=config.dropout,
                                rngs=nnx.Rngs(s)))
            for s in config.seeds}
  model_fn = models[config.seeds[0]][0]
  runs: dict[str, dict[str, dict]] = {}
  unbiased: dict[str, bool] = {}
  records: list[dict] = []

  def train(method: str, lr: float, budget: float, curve: bool = True
            ) -> dict[str, dict]:
    """Every seed of one (method, lr, budget), one compiled runner."""
    runner = MethodRunner(method, factories[method], dataclasses.replace(config, lr=lr),
                          train_set, test, raw["y_train"], classes, model_fn,
                          budget=budget)
    unbiased[method] = runner.sampler.unbiased
    by_seed = {}
    for seed in config.seeds:
      run = runner.run(models[seed][1], seed, quiet=quiet,
                       model_state=models[seed][2], curve=curve)
      by_seed[str(seed)] = run
      records.append(frontier.record(method, seed, lr, run["budget_epochs"], run))
      last = run["curve"][-1]
      if not quiet:
        print(f"{method:5s} lr {lr:g} budget {run['budget_epochs']:g} seed {seed}: "
              f"train loss {last['train_loss']:.4f}, "
              f"test acc {last['test_accuracy']:.4f}, wall "
              f"{last['wall_clock_s']:.1f} s, epochs {last['epoch']:.2f}, epochs "
              f"equivalent {last['epochs_equivalent']:.1f}, r "
              f"{last['gain_ratio']:.2f}, (PT) solves {last['pt_solves']} "
              f"(failed {last['pt_failures']}), non-finite norms "
              f"{last['nonfinite_norms']}, skipped steps {last['skipped_steps']}",
              flush=True)
    return by_seed

  # The main comparison (``lr``, full budget; its curves are kept), then the
  # rest of the frontier (its records only, evaluated at the end only).
  for method in config.methods:
    runs[method] = train(method, config.lr, 1.0)
  for lr in config.frontier_lrs:
    for method in config.methods:
      for budget in config.frontier_budgets if method == "usgd" else (1.0,):
        if (lr, budget) != (config.lr, 1.0):
          train(method, lr, budget, curve=False)
  results = {"config": dataclasses.asdict(config),
             "dataset": {"n_train": int(len(raw["y_train"])),
                         "n_test": int(len(raw["y_test"])),
                         "input_shape": list(input_shape), "classes": classes},
             "environment": environment(),
             "runs": runs, "frontier": records,
             "summary": summarise(runs, unbiased, records, config.lr)}
  if out is not None:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if plots:
      from rais_jax.experiments import plots as plots_lib  # pylint: disable=g-import-not-at-top
      plots_lib.plot_compare(results, out)
  return results


def format_stats(stats: dict, spec: str) -> str:
  """``median [min, max]`` of a summary entry, or — if no seed reached it."""
  if stats.get("median") is None:
    return "—"
  return (f"{stats['median']:{spec}} [{stats['min']:{spec}}, "
          f"{stats['max']:{spec}}]")


def format_summary(summary: dict) -> str:
  """The summary as a small text table."""
  if "methods" not in summary:
    return summary.get("note", "")
  fmt, speed = format_stats, frontier.format_speedups
  front = summary.get("frontier", {})
  lines = ["target: U-SGD's final training loss per seed; median [min, max] "
           "over seeds; RAIS, O-SGD and naive stop when their schedule's budget "
           "(epochs equivalent) is spent",
           f"budget-matched: the wall-clock U-SGD's frontier (schedule fully "
           f"decayed over each of {front.get('usgd_budgets_epochs')} epochs, best "
           f"lr of {front.get('lrs')}) needs to reach the method's final quality, "
           "over the method's; >x: U-SGD never reaches it, <x: its smallest "
           "budget does better",
           f"{'method':18s} {'reached':>7s} {'epochs to target':>18s} "
           f"{'wall-clock to target (s)':>26s} {'speed-up (epochs)':>20s} "
           f"{'speed-up (wall-clock)':>22s} {'epochs run':>20s} "
           f"{'ms per step':>20s} {'final test acc':>22s} "
           f"{'U-SGD acc, same epochs':>24s} "
           f"{'budget-matched speed-up: train loss':>38s} {'test accuracy':>30s}"]
  for method, e in summary["methods"].items():
    matched = e.get("budget_matched_speedup", {})
    lines.append(
        f"{method:18s} {e['epoch']['reached']:>7s} {fmt(e['epoch'], '.1f'):>18s} "
        f"{fmt(e['wall_clock_s'], '.2f'):>26s} "
        f"{fmt(e['speedup_epoch'], '.2f'):>20s} "
        f"{fmt(e['speedup_wall_clock_s'], '.2f'):>22s} "
        f"{fmt(e['epochs_run'], '.1f'):>20s} "
        f"{fmt(e.get('ms_per_step', {}), '.3f'):>20s} "
        f"{fmt(e['final_test_accuracy'], '.3f'):>22s} "
        f"{fmt(e['usgd_at_equal_epochs']['test_accuracy'], '.3f'):>24s} "
        f"{speed(matched.get('final_train_loss')):>38s} "
        f"{speed(matched.get('final_test_accuracy')):>30s}")
  for lr, by_method in front.get("budget_matched_speedup_by_lr", {}).items():
    if float(lr) == front.get("lr"):
      continue
    parts = [f"{m} {speed(e.get('final_train_loss'))} / "
             f"{speed(e.get('final_test_accuracy'))}" for m, e in by_method.items()]
    lines.append(f"budget-matched speed-up (train loss / test accuracy) at lr "
                 f"{lr}: " + "; ".join(parts))
  for name, order in summary.get("ranking", {}).items():
    lines.append(f"ranked by {name.replace('_', ' ')}: {' > '.join(order)}")
  for method, e in summary["methods"].items():
    matched = e.get("budget_matched_speedup", {})
    if method != "usgd" and matched:
      lines.append(
          f"{method} at lr {front.get('lr')} against U-SGD's budget-matched frontier: "
          f"speed-up {speed(matched.get('final_train_loss'))} to its final training "
          f"loss and {speed(matched.get('final_test_accuracy'))} to its final test "
          f"accuracy in wall-clock ({speed(matched.get('final_train_loss_by_epochs'))} "
          f"and {speed(matched.get('final_test_accuracy_by_epochs'))} in epochs); "
          "median [min, max] over seeds; below 1: U-SGD with a shorter, fully "
          "decayed schedule gets there sooner")
  return "\n".join(lines)
