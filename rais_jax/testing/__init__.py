"""Test helpers: ``zoo``, small models of many kinds for the per-example
norm tests and benchmarks (needs the ``experiments`` extra)."""
