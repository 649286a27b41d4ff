"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100) at every
configuration its launcher can pick, spilling at most a few words of registers.

The interpreter (which the CPU tests use) never lowers a kernel, so a lowering error, a
configuration that does not fit in registers, or a tile the compiler needs minutes for would
show only on a GPU. ``bench/triton_static.py`` compiles each configuration listed by the kernel
modules' ``launch_configs()`` for both targets (no GPU needed) and fails on a compile error or
on spill stores above ``SPILL_BUDGET_BYTES`` (64 bytes per thread). It runs in a fresh process without
``TRITON_INTERPRET``: the interpreter and the compiler do not mix in one process.

The first test compiles the largest-tile configuration of each kernel (10 kernels, 20
compilations: 77 s on a shared 2-core machine); the second, marked slow (``SLOW`` in
``tests/conftest.py``), all of them (121 configurations, 242 compilations: 597 s there).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _static(*args: str, timeout: int) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_static.py"), "--check",
                           *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    problems = [line for line in done.stdout.splitlines() if line.startswith("PROBLEM")]
    assert done.returncode == 0, "\n".join(problems) or (done.stdout + done.stderr)[-4000:]


def test_largest_tiles_compile_within_the_spill_budget():
    """Per kernel the configuration with the largest tiles, for sm_80 and sm_90."""
    _static("--fast", timeout=1200)


def test_every_configuration_compiles_within_the_spill_budget():  # marked slow in conftest
    """Every configuration every launcher can pick, for sm_80 and sm_90."""
    _static(timeout=3600)
