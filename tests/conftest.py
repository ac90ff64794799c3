import os
import tempfile

#: The tests check behaviour and numbers, never speed, and most of their time
#: is XLA compiling; its CPU backend's LLVM optimisation of the generated code
#: is a quarter to a third of that (measured: 109 s -> 81 s and 81 s -> 55 s on
#: two samples of the slowest tests). XLA's own graph passes (fusion, layout)
#: still run, and floating-point semantics do not change with the level.
#: Child processes (the notebooks' kernels, the experiments) inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# The experiments command turns on JAX's persistent compilation cache; tests
# that run it in-process must not fill (or read) the user's own cache.
os.environ.setdefault(
    "NEURALODE_CACHE_DIR", tempfile.mkdtemp(prefix="neuralode-test-cache-")
)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    return jax.random.key(0)


#: The files with the longest tests, run first: `pytest -n 2` hands tests out in
#: collection order, and a long test collected last leaves one worker idle
#: while the other finishes it. Files stay contiguous (module fixtures are set
#: up once).
LONGEST_FIRST = (
    "test_notebooks.py",
    "test_experiments.py",
    "test_stiff_experiment.py",
    "test_stiff.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return (
            LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        )

    items.sort(key=rank)  # stable: the order within a file is kept
