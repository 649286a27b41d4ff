"""The result file of bench/gpu_check.sh, written step by step (a run cut short still leaves the
steps done so far).

``bench/results/<gpu-name>.json`` holds::

    {"environment": {device name, driver, CUDA (torch's and nvcc's), torch, triton, ...},
     "gpu_check": {"budget_s", "steps": [{"name", "status", "seconds", "log", "detail"}, ...],
                   "skipped": [{"name", "reason"}, ...], "complete": bool},
     "results": [kfac-bench's records, once its step ran]}

Subcommands (used by the script; each rewrites the file in place)::

    python bench/gpu_check_summary.py env FILE --budget S       # start the file (needs torch)
    python bench/gpu_check_summary.py step FILE NAME STATUS SECONDS LOG [DETAIL]
    python bench/gpu_check_summary.py skip FILE NAME REASON
    python bench/gpu_check_summary.py junit XML                  # "12 passed, 0 failed, 3 skipped"
    python bench/gpu_check_summary.py bench FILE BENCH_JSON      # kfac-bench's records and env
    python bench/gpu_check_summary.py done FILE
    python bench/gpu_check_summary.py slug NAME                  # the file name kfac-bench uses
"""
from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def slug(name: str) -> str:
    """The file stem kfac-bench gives a device's results."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"environment": {}, "gpu_check": {"steps": [], "skipped": [], "complete": False}}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def environment() -> dict:
    """Device, driver and versions (what torch and the tools on PATH report)."""
    import torch

    env = {"torch": torch.__version__, "cuda_torch": torch.version.cuda,
           "python": sys.version.split()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        env["compute_capability"] = f"{major}.{minor}"
        env["device_count"] = torch.cuda.device_count()
    else:
        env["device_name"] = None
    env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    nvcc = _run(["nvcc", "--version"])
    lines = nvcc.strip().splitlines() if nvcc else []
    # "Cuda compilation tools, release 13.0, V13.0.88" (its line moves between versions)
    env["nvcc"] = next((l for l in lines if "release" in l), lines[-1] if lines else None)
    return env


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def junit_counts(xml_path: Path) -> str:
    """'P passed, F failed, S skipped' of a pytest --junitxml file."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "slug":
        print(slug(args[0]))
        return 0
    if cmd == "junit":
        print(junit_counts(Path(args[0])))
        return 0
    path = Path(args[0])
    data = _load(path)
    check = data.setdefault("gpu_check", {"steps": [], "skipped": [], "complete": False})
    if cmd == "env":
        data["environment"] = environment()
        if len(args) >= 3 and args[1] == "--budget":
            check["budget_s"] = float(args[2])
    elif cmd == "step":
        name, status, seconds, log = args[1:5]
        detail = args[5] if len(args) > 5 else ""
        check["steps"].append({"name": name, "status": status, "seconds": float(seconds),
                               "log": log, "detail": detail})
    elif cmd == "skip":
        check["skipped"].append({"name": args[1], "reason": args[2]})
    elif cmd == "bench":
        bench = json.loads(Path(args[1]).read_text())
        data["results"] = bench.get("results", [])
        for key, value in bench.get("environment", {}).items():
            data["environment"].setdefault(key, value)
    elif cmd == "done":
        check["complete"] = True
    else:
        print(f"unknown subcommand {cmd!r}", file=sys.stderr)
        return 2
    _save(path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
