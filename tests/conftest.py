import os
import tempfile

import jax
import pytest

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
