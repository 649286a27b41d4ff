"""Shared fixtures: a small real data set (scikit-learn's bundled digits), a small CNN factory, and
a fixed seed for every test."""
from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (the README's test command and CI do)")


# The long tests (each several seconds or more: end-to-end training, multi-process runs, the
# Triton interpreter at larger sizes, memory measurements, ahead-of-time compilation), marked
# slow by node id here so the list stays in one place.
SLOW = (
    "tests/test_distributed.py::*",
    "tests/test_train_cli.py::test_compare_*", "tests/test_train_cli.py::test_help_runs_*",
    "tests/test_train_cli.py::test_*_default_reaches_*",
    "tests/test_train_cli.py::test_other_tasks_*",
    "tests/test_singd_train.py::*",
    "tests/test_singd_fused_block.py::*triton*",
    "tests/test_singd_block_step.py::test_backends_match_eager_at_block_sizes*triton*",
    "tests/test_patch_covariance_chunked.py::test_chunked_memory_*",
    "tests/test_patch_covariance.py::test_cpu_temporaries_*",
    "tests/test_patch_covariance.py::test_hypothesis_*",
    "tests/test_fuzz.py::*", "tests/test_patch_covariance_outliers.py::*triton*",
    "tests/test_block_eigh.py::*triton*", "tests/test_block_eigh_scale.py::*-triton*",
    "tests/test_triton_aot.py::test_every_configuration_*",
    "tests/test_kfac.py::test_kfac_beats_sgd_*", "tests/test_kfac.py::test_kfac_with_kl_clip_*",
    "tests/test_bdkfac.py::test_bdkfac_beats_*",
    "tests/test_twolevel.py::test_deep_linear_*", "tests/test_twolevel.py::test_coarse_fisher_mc_*",
    "tests/test_oracles.py::test_mc_fisher_converges_*",
    "tests/test_symmetric_factor_update.py::test_torch_compile_*",
    "tests/test_symmetric_factor_update.py::test_triton_tiling*",
    "tests/test_patch_covariance_triton.py::test_split_rows_*",
    "tests/test_ops.py::*triton*",
    # 3-10 s each: a subprocess, a GPU-target compilation or a bank-access count
    "tests/test_triton_aot.py::test_largest_tiles_compile_within_the_spill_budget",
    "tests/test_block_eigh_banks.py::test_padded_kernel_is_conflict_free_and_unpadded_is_not",
    "tests/test_package.py::test_no_top_level_triton_kernels_module",
    "tests/test_ops.py::test_fake_kernels_exist_and_validate_without_the_extension",
    "tests/test_triton_limits.py::test_singd_diagonal_step_rows_past_2_31",
    "tests/test_symmetric_factor_update.py::test_triton_package_is_lazy",
    "tests/test_gpu_check.py::test_dry_run_lists_every_step_and_tool",
    "tests/test_gpu_check.py::test_without_gpu_nothing_runs",
)


def pytest_collection_modifyitems(config, items):
    """Mark the SLOW tests; without --run-slow the tests marked ``slow`` are deselected, and
    the run says so."""
    for item in items:
        if any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
        config._kfac_slow_deselected = len(slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_kfac_slow_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} tests marked slow were not run (add --run-slow to "
                                    "run them; the README's test command and CI do)")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["host-read", "device-select"])
def stored_health_path(request):
    """Both ways a health flag decides what is stored: read on the host (CPU tensors) and
    selected on the device by ``torch.where`` (what a GPU does; ``CPU_READS_FREE`` off)."""
    from _syncs import host_reads
    with host_reads(request.param == "host-read"):
        yield request.param


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread (restored afterwards). Their tensors are
    tiny, so threads only add synchronisation cost, which explodes on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load_digits_tensors(n_train: int = 512, n_test: int = 256):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    # A fixed permutation so train and test both hold every class.
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    x_train, y_train = x[:n_train], y[:n_train]
    x_test, y_test = x[n_train:n_train + n_test], y[n_train:n_train + n_test]
    # Standardise every pixel with the training statistics (constant pixels stay at 0).
    mean = x_train.mean(0)
    std = x_train.std(0).clamp_min(1e-6)
    x_train = ((x_train - mean) / std).to(torch.float32).reshape(-1, 1, 8, 8)
    x_test = ((x_test - mean) / std).to(torch.float32).reshape(-1, 1, 8, 8)
    return x_train.contiguous(), y_train, x_test.contiguous(), y_test


class Digits:
    """A deterministic, standardised subset of digits: ``(N, 1, 8, 8)`` float32 images."""

    def __init__(self, n_train: int = 512, n_test: int = 256):
        self.x_train, self.y_train, self.x_test, self.y_test = _load_digits_tensors(
            n_train, n_test)

    def batches(self, batch_size: int, steps: int, seed: int = 0):
        """``steps`` training batches drawn from a seeded generator (the same every call)."""
        gen = torch.Generator().manual_seed(seed)
        n = self.x_train.shape[0]
        out = []
        perm = torch.randperm(n, generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > n:
                perm = torch.randperm(n, generator=gen)
                pos = 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            out.append((self.x_train[idx], self.y_train[idx]))
        return out


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits()


def build_cnn(seed: int = 0, *, inplace: bool = True, groups: int = 2,
              dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Conv(1->8) -> ReLU -> Conv(8->16, groups) -> ReLU -> MaxPool -> Linear(256->32) -> ReLU
    -> Linear(32->10), for ``(N, 1, 8, 8)`` inputs; initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(8, 16, 3, padding=1, groups=groups),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(inplace=inplace),
            nn.Linear(32, 10),
        )
    return model.to(dtype)


@pytest.fixture
def make_cnn():
    """Factory: ``make_cnn(seed=0, inplace=True, groups=2, dtype=torch.float32)``."""
    return build_cnn
