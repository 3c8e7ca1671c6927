"""Shared fixtures. `isa` runs a kernel test once on every ISA path this CPU supports."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit import kernels

# Tests run on 2 cores next to other work: keep torch's intra-op pool small and deterministic.
# Under pytest-xdist (2 workers on 2 cores) each worker gets one thread unless a test asks for more.
_default_threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("LOWBIT_TEST_THREADS", _default_threads)))


def _isa_params() -> list[str]:
    forced = os.environ.get("LOWBIT_ISA")
    # With LOWBIT_ISA set, run only that path (that is what forcing means); otherwise all of them.
    return [forced] if forced else kernels.available_isas()


@pytest.fixture(params=_isa_params())
def isa(request: pytest.FixtureRequest) -> str:
    with kernels.use_isa(request.param):
        yield request.param
