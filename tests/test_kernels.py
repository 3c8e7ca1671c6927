"""Binary packing and popcount GEMM, bit-exact against NumPy int64 references on every ISA path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import kernels


def _signs(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, -1, 1).astype(np.int64)


@pytest.mark.parametrize("k", [1, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 511, 512, 513, 1000])
def test_pack_signs_matches_numpy(isa: str, k: int) -> None:
    x = np.random.default_rng(k).standard_normal((5, k)).astype(np.float32)
    got = kernels.pack_signs(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, kernels.pack_signs_reference(x))


def test_pack_signs_special_values(isa: str) -> None:
    # sign(0) = sign(-0.0) = +1 and NaN packs as +1 (bit 0); -inf and tiny negatives are -1.
    x = np.array(
        [[0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, -1e-45, 1e-45, -1.0, 2.0] * 2],
        dtype=np.float32,
    )
    got = kernels.pack_signs(torch.from_numpy(x)).numpy()
    bits = np.unpackbits(got, axis=1, bitorder="little")[0, : x.shape[1]]
    expected = np.array([0, 0, 0, 0, 0, 1, 1, 0, 1, 0] * 2, dtype=np.uint8)
    np.testing.assert_array_equal(bits, expected)


def test_pack_signs_of_noncontiguous_input(isa: str) -> None:
    x = torch.randn(40, 300)[::3, 5:250]
    got = kernels.pack_signs(x).numpy()
    np.testing.assert_array_equal(got, kernels.pack_signs_reference(x.numpy()))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 37),
    k=st.integers(1, 1100),
    seed=st.integers(0, 2**31 - 1),
)
def test_binary_gemm_matches_int64_reference(m: int, n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    expected = kernels.binary_matmul_reference(_signs(a), _signs(w))
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            got = kernels.binary_gemm(
                kernels.pack_signs(torch.from_numpy(a)), kernels.pack_signs(torch.from_numpy(w)), k
            )
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"isa={isa}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_binary_gemm_threads_and_extremes(isa: str, threads: int) -> None:
    # All-equal rows give +K, all-opposite rows -K; a large N exercises the thread split.
    k, n = 4097, 333
    a = np.ones((3, k), dtype=np.float32)
    a[1] = -1.0
    a[2, ::2] = -1.0
    w = np.random.default_rng(1).choice([-1.0, 1.0], size=(n, k)).astype(np.float32)
    w[0] = 1.0
    w[1] = -1.0
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.binary_gemm(
            kernels.pack_signs(torch.from_numpy(a)), kernels.pack_signs(torch.from_numpy(w)), k
        )
    finally:
        torch.set_num_threads(previous)
    expected = kernels.binary_matmul_reference(_signs(a), _signs(w))
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got[0, 0] == k and got[0, 1] == -k and got[1, 1] == k


def test_binary_gemm_rejects_mismatched_operands() -> None:
    a = kernels.pack_signs(torch.randn(2, 64))
    w = kernels.pack_signs(torch.randn(3, 128))
    with pytest.raises(ValueError, match="equal row bytes"):
        kernels.binary_gemm(a, w, 64)
    with pytest.raises(ValueError, match="k does not fit"):
        kernels.binary_gemm(a, a, 65)


def test_cpu_features_report() -> None:
    feats = kernels.cpu_features()
    assert feats["compiled"] == ["scalar", "avx2", "avx512"]
    assert feats["active"] in feats["supported"]
    assert "scalar" in feats["supported"]
    # The supported list must agree with the reported flags.
    assert ("avx512" in feats["supported"]) == all(
        feats["flags"][f]
        for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vpopcntdq")
    )
    assert ("avx2" in feats["supported"]) == (feats["flags"]["avx2"] and feats["flags"]["fma"])


def test_use_isa_rejects_unknown_path() -> None:
    with pytest.raises(ValueError, match="unknown ISA path"), kernels.use_isa("neon"):
        pass


def test_use_isa_of_a_path_this_cpu_lacks_raises_the_setup_error() -> None:
    lacking = [i for i in kernels.ISA_PATHS if i not in kernels.available_isas()]
    if not lacking:
        pytest.skip("this CPU runs every path")
    # as LOWBIT_ISA does
    with pytest.raises(kernels.IsaError, match="cannot run the"), kernels.use_isa(lacking[0]):
        pass


def _import_with_env(isa: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LOWBIT_ISA=isa)
    code = "import lowbit; print(lowbit.kernels.active_isa())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_lowbit_isa_env_forces_a_path() -> None:
    for isa in kernels.available_isas():
        result = _import_with_env(isa)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == isa


def test_lowbit_isa_env_rejects_bad_values() -> None:
    result = _import_with_env("sse9")
    assert result.returncode != 0
    assert "LOWBIT_ISA='sse9' is not a kernel path" in result.stderr


def test_forcing_a_path_the_cpu_lacks_names_the_missing_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulate a CPU without AVX-512 (this machine has it) by faking the feature check.
    monkeypatch.setenv("LOWBIT_ISA", "avx512")
    monkeypatch.setattr(kernels._ext, "missing_features", lambda isa: "avx512vnni, avx512vpopcntdq")
    monkeypatch.setattr(kernels._ext, "supported_isas", lambda: ["scalar", "avx2"])
    with pytest.raises(
        RuntimeError, match=r"LOWBIT_ISA=avx512 was requested but this CPU lacks avx512vnni"
    ):
        kernels._apply_env_isa()


FORK_SCRIPT = """
import os, sys, torch
from lowbit import kernels
torch.set_num_threads(2)
tiles = kernels.pack_ternary(torch.randint(-1, 2, (256, 512), dtype=torch.int8))
scale, _ = kernels.pack_ternary_scales(torch.tensor(0.5), 256, 512)
layer = kernels.LinearKernel(tiles, scale, out_features=256)
x = torch.randn(64, 512)
want = layer(x)  # the parent's pool now has a worker thread
pid = os.fork()
if pid == 0:  # the child has no pool threads: its first parallel call must not wait for them
    ok = torch.equal(layer(x), want) and torch.equal(layer(x), want)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_kernels_run_in_a_forked_child() -> None:
    # gunicorn --preload, multiprocessing with fork: the kernels' thread pool starts afresh in
    # the child instead of waiting forever for threads that were not forked.
    res = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
