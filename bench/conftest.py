"""Shared pytest configuration for the microbenchmarks.

The benchmark files are named ``bench_*.py`` and their functions ``test_*``. Run them with::

    python -m pytest bench --benchmark-only                  # all of them
    python -m pytest bench/bench_symmetric_factor_update.py --benchmark-only
    python -m pytest bench --benchmark-only --benchmark-json=bench/results/<device>.json

(``bench_*.py`` files are collected by the hook below, so ``-o python_files=...`` is not needed.)

Every benchmark records in ``benchmark.extra_info``: the device's name (the GPU's, or the CPU
model from ``/proc/cpuinfo``), the torch, Triton and Python versions, the CPU thread count and the
date (UTC). A benchmark that runs out of memory (``torch.OutOfMemoryError``, or the CPU allocator
failing) is skipped with the reason ``out of memory``, marked ``extra_info["oom"]``, listed at the
end of the run and in the saved JSON under ``"out_of_memory"``.
"""
from __future__ import annotations

import datetime
import fnmatch
import platform
import sys
from functools import lru_cache

import pytest
import torch

_OOM_KEY = pytest.StashKey[list]()


# ---------------------------------------------------------------------------------------------
# collection: bench_*.py files


def pytest_collect_file(parent, file_path):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: the python plugin collects it already
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None  # the project's python_files already matches it
    return pytest.Module.from_parent(parent, path=file_path)


# ---------------------------------------------------------------------------------------------
# environment recorded with every benchmark


@lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


@pytest.fixture(autouse=True)
def _benchmark_environment(request):
    """Add :func:`environment_info` for the test's ``device`` parameter to ``extra_info``."""
    if "benchmark" in request.fixturenames:
        callspec = getattr(request.node, "callspec", None)
        device = callspec.params.get("device", "cpu") if callspec is not None else "cpu"
        request.getfixturevalue("benchmark").extra_info.update(environment_info(device))
    yield


# ---------------------------------------------------------------------------------------------
# out of memory: recorded as such, not as a failure


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in str(err) or "out of memory" in str(err).lower())


def pytest_configure(config):
    config.stash[_OOM_KEY] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as err:
        if not _is_oom(err):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        bench = getattr(item, "funcargs", {}).get("benchmark")
        if bench is not None:
            bench.extra_info["oom"] = message
        item.user_properties.append(("oom", message))
        item.config.stash[_OOM_KEY].append({"name": item.nodeid, "error": message})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {message}")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["out_of_memory"] = list(config.stash.get(_OOM_KEY, []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ooms = config.stash.get(_OOM_KEY, [])
    if ooms:
        terminalreporter.section("out of memory")
        for rec in ooms:
            terminalreporter.write_line(f"{rec['name']}: {rec['error']}")
