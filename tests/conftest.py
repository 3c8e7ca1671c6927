"""Shared fixtures. `isa` runs a kernel test once on every ISA path this CPU supports."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit import kernels

# Tests run on 2 small cores, often next to other work: one intra-op thread by default keeps
# small-tensor tests fast and deterministic (tests that need threads set them explicitly).
torch.set_num_threads(int(os.environ.get("LOWBIT_TEST_THREADS", "1")))


def _isa_params() -> list[str]:
    forced = os.environ.get("LOWBIT_ISA")
    # With LOWBIT_ISA set, run only that path (that is what forcing means); otherwise all of them.
    return [forced] if forced else kernels.available_isas()


@pytest.fixture(params=_isa_params())
def isa(request: pytest.FixtureRequest) -> str:
    with kernels.use_isa(request.param):
        yield request.param
