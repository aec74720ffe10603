"""The CUDA path's algorithm setting, which every build has (a CPU-only build keeps it with nothing
to act on): names, validation, restoration. What each setting runs is tested on a GPU
(tests/test_cuda.py)."""

import pytest

import fusedtie


def test_setting_is_restored_and_validated():
    lib = fusedtie._LIB
    assert lib.cuda_conv_algorithm() == "auto"
    for name in ("autotune", "fused", "library", "auto"):
        with fusedtie.use_cuda_conv_algorithm(name):
            assert lib.cuda_conv_algorithm() == name
        assert lib.cuda_conv_algorithm() == "auto"
    with fusedtie.use_cuda_conv_algorithm("fused"):
        with pytest.raises(
            ValueError, match="unknown CUDA convolution algorithm 'fast'.*auto, autotune, fused, library"
        ):
            with fusedtie.use_cuda_conv_algorithm("fast"):
                pass
        assert lib.cuda_conv_algorithm() == "fused"
    assert lib.cuda_conv_algorithm() == "auto"


def test_autotune_cache_starts_empty_and_clears():
    fusedtie._LIB.clear_cuda_autotune_cache()
    assert fusedtie._LIB.cuda_autotune_cache_size() == 0


def test_cpu_and_cuda_settings_are_independent():
    with fusedtie.use_cuda_conv_algorithm("library"), fusedtie.use_cpu_conv_algorithm("gemm"):
        assert fusedtie._LIB.cpu_conv_algorithm() == "gemm"
        assert fusedtie._LIB.cuda_conv_algorithm() == "library"
