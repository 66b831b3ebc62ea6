"""The fast path's static schedule (rais_jax.schedule): pure arithmetic, no model."""

import pytest

from rais_jax.schedule import Schedule, binary, powers_of_two

K = 4


def test_one_program_per_gap_between_breaks():
  """(PT) period 8, delay 8: breaks at 0 mod 8, so two blocks per program;
  a run that starts between breaks gets powers of two blocks up to the next."""
  rais = Schedule(K, 8, (0,), 15)
  assert rais.programs(0, 32) == [(2, K)] * 4
  assert rais.programs(4, 20) == [(1, K), (2, K), (2, K)]
  delayed = Schedule(K, 8, (0, 4), 15)  # deliveries off the snapshots
  assert delayed.programs(0, 16) == [(1, K)] * 4
  assert delayed.gaps() == {1}


def test_without_breaks_an_epoch_is_one_program():
  """No period work: the whole blocks of an epoch (15 steps: 3 blocks) are
  one program; other stretches split into powers of two blocks, then the
  rest (< K) in powers of two."""
  usgd = Schedule(K, K, (), 15)
  assert not usgd.whole_blocks
  assert usgd.programs(0, 15) == [(3, K), (1, 2), (1, 1)]
  assert usgd.programs(0, 7 * K + 3) == [(4, K), (2, K), (1, K), (1, 2), (1, 1)]


def test_also_at_stops_at_a_restored_solve():
  """A solve due off the breaks (a state from elsewhere) is a stop too."""
  rais = Schedule(K, 16, (0,), 15)
  assert rais.programs(0, 16) == [(4, K)]
  assert rais.programs(0, 16, also_at=(8,)) == [(2, K), (2, K)]
  assert rais.programs(0, 16, also_at=(6,)) == [(4, K)]  # not a block boundary


@pytest.mark.parametrize("epoch, period", [(15, 9), (12, 8), (7, 21)])
def test_epoch_programs_cover_every_phase(epoch, period):
  """Epoch-by-epoch training from step 0 issues, in every phase of the
  break period, only programs that epoch_programs lists."""
  sched = Schedule(1 if period % K else K, period, (0,), epoch)
  epochs, every = sched.epoch_programs()
  step = 0
  for _ in range(3 * len(epochs)):
    assert set(sched.programs(step, epoch)) <= every
    step += epoch
  assert {p for e in epochs for p in e} <= every


def test_binary_and_powers_of_two():
  assert binary(13) == [8, 4, 1] and binary(0) == []
  assert powers_of_two(5) == [1, 2, 4]
  assert all(p in powers_of_two(n) for n in range(1, 40) for p in binary(n))
