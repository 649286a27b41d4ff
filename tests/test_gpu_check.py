"""The GPU runbook (bench/gpu_check.sh) on a machine without a GPU: the script parses, its dry run
lists every step and checks its tools, a real run says that there is nothing to check, and the
result file it writes step by step has the promised content."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the runbook needs bash and coreutils' timeout")


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary",
                                                  ROOT / "bench" / "gpu_check_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dry_run_lists_every_step_and_tool():
    r = _run("--dry-run", "--budget", "300")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for step in ("environment", "build", "pytest-gpu", "cuda-tests", "sanitizer", "bench"):
        assert step in out, f"step {step} missing from the plan:\n{out}"
    for tool in ("python", "torch", "pytest", "nvcc", "cmake", "compute-sanitizer", "kfac-bench"):
        assert f" {tool}:" in out, f"tool {tool} not checked:\n{out}"
    assert "env -u TRITON_INTERPRET" in out and "-m gpu" in out
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert tool in out
    assert "budget 300 s" in out
    assert "tool(s) missing" in out


def test_unknown_option_is_refused():
    r = _run("--no-such-option")
    assert r.returncode == 2 and "unknown option" in r.stderr


def test_without_gpu_nothing_runs(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the runbook would really run")
    r = _run("--out", str(tmp_path))
    assert r.returncode == 1
    assert "no CUDA device" in r.stderr
    assert not list(tmp_path.iterdir())


def test_result_file_is_written_step_by_step(tmp_path):
    mod = _summary_module()
    path = tmp_path / f"{mod.slug('NVIDIA H100 80GB HBM3')}.json"
    assert path.name == "nvidia-h100-80gb-hbm3.json"
    assert mod.main(["env", str(path), "--budget", "480"]) == 0
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("device_name", "driver", "cuda_torch", "nvcc", "torch", "triton"):
        assert key in env
    assert data["gpu_check"]["budget_s"] == 480 and not data["gpu_check"]["complete"]
    assert mod.main(["step", str(path), "build", "passed", "12", "log.txt"]) == 0
    assert mod.main(["skip", str(path), "sanitizer", "compute-sanitizer not found"]) == 0
    data = json.loads(path.read_text())  # a run stopped here still has this much
    assert data["gpu_check"]["steps"] == [{"name": "build", "status": "passed", "seconds": 12.0,
                                           "log": "log.txt", "detail": ""}]
    assert data["gpu_check"]["skipped"][0]["name"] == "sanitizer"
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"environment": {"device_name": "x", "threads": 8},
                                 "results": [{"op": "singd_block_step", "status": "ok"}]}))
    assert mod.main(["bench", str(path), str(bench)]) == 0
    assert mod.main(["done", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["results"] == [{"op": "singd_block_step", "status": "ok"}]
    assert data["environment"]["threads"] == 8  # added, the runbook's own values kept
    assert data["gpu_check"]["complete"]


def test_junit_counts(tmp_path):
    mod = _summary_module()
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2">'
                   "</testsuite></testsuites>")
    assert mod.junit_counts(xml) == "3 passed, 2 failed, 2 skipped"


def test_targets_script_runs_its_kernel_sections_on_cpu(tmp_path):
    """bench/gpu_targets.py (the GPU pass's target measurements) with tiny shapes on the CPU:
    every case is checked against its reference and timed, and none fails."""
    out = tmp_path / "targets.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_targets.py"), "--device", "cpu",
                        "--small", "--sections", "patch_covariance", "block_eigh", "singd_steps",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    for section in ("patch_covariance", "block_eigh", "singd_steps"):
        assert data[section], section
        for row in data[section]:
            cpu = row["cpu"]
            assert "failed" not in cpu, (row["target"], cpu)
            assert cpu["s"] > 0
            err = cpu.get("error", cpu.get("residual"))
            assert err is not None and err < 1e-2, (row["target"], cpu)
    for row in data["patch_covariance"]:  # each Triton expand kernel timed by name too
        if "triton" in row and row["mode"] == "expand":
            tensor_cores = row["dtype"] != "float32" or row["allow_tf32"]
            for kernel in ("triton_generic",) + (("triton_channels",) if tensor_cores else ()):
                assert "failed" not in row[kernel] and row[kernel]["error"] < 1e-2, (
                    row["target"], kernel, row[kernel])
