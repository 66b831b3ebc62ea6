import os

# Tests run on CPU, in float32, deterministically.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
