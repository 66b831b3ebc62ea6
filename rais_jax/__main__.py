"""``python -m rais_jax compare ...``"""

from rais_jax.experiments.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
