"""Shared fixtures and the test tiers.

- ``fit``: train a LightningModule with an ``SMDCallback`` (``helpers.fit_smd``) under the test's
  ``tmp_path``; ``run_python``: run a script in a fresh interpreter (``helpers.run_python``).
- Tiers: tests marked ``slow`` (long fits, the examples, the benchmarks, multi-process runs) are left out
  by ``pytest -m "not slow"``, the tier to run while developing; CI runs everything.
- Threads: the suite's fits are tiny; torch runs them on one intra-op thread (:func:`pytest_configure`), as the
  benchmarks behind the tests' margins do, unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import fit_smd, run_python  # noqa: E402


def pytest_configure(config):
    """One intra-op thread for the in-process fits (unless ``OMP_NUM_THREADS`` is set): two OpenMP threads on a 2-core
    machine that other processes share spin against each other, and a 36-step fit of the small test network took
    30 s with two threads against 0.9 s with one."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def fit(tmp_path):
    """``fit(model, steps, *, data=None, trainer_kw=None, **smd_kw) -> Fit(smd, warnings, trainer)``."""
    return functools.partial(fit_smd, tmp_path)


@pytest.fixture(name="run_python")
def _run_python():
    """``run_python(args, *, cwd=ROOT, env=None, timeout=280, check=True) -> CompletedProcess``."""
    return run_python


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """A test that changes torch's process-wide settings (threads, default dtype, deterministic algorithms) must not
    change the floating-point trajectory of the tests after it: the suite's results may not depend on its order."""
    import torch

    threads, dtype, deterministic = torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
