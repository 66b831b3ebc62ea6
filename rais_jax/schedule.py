"""The fast path's static schedule: which programs a run issues, block by block.

Pure arithmetic on step counts, no model and no device: the fast path
(:mod:`rais_jax.runner`) runs blocks of K steps and returns to the host only
at *breaks*, the steps where period work happens ((PT) snapshots and
deliveries, the oracle's refreshes), which repeat every ``period`` steps. The
blocks between two breaks are one program (a scan over blocks); a run that
starts or ends between breaks is split into powers of two blocks, so that few
programs are compiled; the rest, shorter than K, in single blocks of powers
of two.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Schedule(NamedTuple):
  """Breaks at ``breaks`` (mod ``period``) in a run of blocks of K steps."""

  block_size: int  # K
  period: int  # of the breaks, in steps (a multiple of K)
  # Steps mod ``period`` at which the host does period work; empty for
  # methods without period work.
  breaks: tuple[int, ...]
  # n // m, the steps of an epoch (the stretch of blocks one program runs
  # when there are no breaks).
  epoch_steps: int

  @property
  def whole_blocks(self) -> bool:
    """Period work happens at block boundaries: runs are in whole blocks."""
    return bool(self.breaks)

  def gaps(self) -> set[int]:
    """Numbers of blocks between consecutive breaks; without breaks, the
    whole blocks of an epoch."""
    k = self.block_size
    if not self.breaks:
      return {self.epoch_steps // k}
    breaks = list(self.breaks)
    ends = breaks[1:] + [breaks[0] + self.period]
    return {(b - a) // k for a, b in zip(breaks, ends)}

  def next_break(self, step: int) -> int:
    """The first break after ``step``."""
    base = step - step % self.period
    marks = list(self.breaks) + [self.breaks[0] + self.period]
    return min(base + b for b in marks if base + b > step)

  def programs(self, step: int, num_steps: int, also_at: tuple[int, ...] = ()
               ) -> list[tuple[int, int]]:
    """(number of blocks, block length) of each program a run of
    ``num_steps`` from ``step`` issues (``also_at``: more steps to stop at,
    e.g. a restored state's due solve).

    Whole blocks run in stretches up to the next break (one program each);
    a stretch as long as the gap between two breaks (without breaks: an
    epoch) is one program, others are split into powers of two blocks. Then
    the rest, shorter than K, in single blocks of powers of two (at most
    log₂ K + 1 programs).
    """
    k = self.block_size
    end = step + num_steps - num_steps % k
    gaps = self.gaps()
    out = []
    while step < end:
      stop = min([end] + [s for s in also_at if s > step and (s - step) % k == 0])
      if self.breaks:
        stop = min(stop, self.next_break(step))
      count = (stop - step) // k
      out += [(count, k)] if count in gaps else [(c, k) for c in binary(count)]
      step = stop
    return out + [(1, n) for n in binary(num_steps % k)]

  def epoch_programs(self) -> tuple[list[list[tuple[int, int]]], set[tuple[int, int]]]:
    """The programs of epoch-by-epoch training from step 0: each epoch's
    list (one per phase of an epoch in the break period), and every program
    those and runs stopping early may use (stretches of powers of two
    blocks)."""
    epoch = max(self.epoch_steps, 1)
    period = self.period if self.breaks else epoch
    epochs = [self.programs(e * epoch % period, epoch)
              for e in range(period // math.gcd(epoch, period))]
    every = {p for sched in epochs for p in sched} | {
        (c, self.block_size) for c in powers_of_two(max(self.gaps()))}
    return epochs, every


def one_block_each(programs: list[tuple[int, int]]) -> list[tuple[int, int]]:
  """The same steps as programs of one block each: (count, length) becomes
  ``count`` times (1, length) (a loader's blocks, unrolled blocks)."""
  return [(1, length) for count, length in programs for _ in range(count)]


def in_blocks(steps: int, block_size: int) -> int:
  """``steps`` rounded up to whole blocks of K (at least one block)."""
  return block_size * max(1, math.ceil(steps / block_size))


def binary(count: int) -> list[int]:
  """``count`` as a sum of powers of two, largest first (13 → [8, 4, 1])."""
  return [1 << b for b in reversed(range(count.bit_length())) if count >> b & 1]


def powers_of_two(top: int) -> list[int]:
  """Every power of two up to ``top`` (the parts :func:`binary` may use)."""
  return [1 << b for b in range(top.bit_length())]
