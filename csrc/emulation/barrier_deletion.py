#!/usr/bin/env python3
"""Barrier-deletion experiment: does some emulated CUDA test fail when one __syncthreads() of a
kernel is deleted?

For every `__syncthreads()` call in csrc/cuda/*.cu and the shared *.cuh headers (one at a time) it runs the emulated tests of
that file (test_<name>_cuda_emulated_sm*, --quick) under the forward and the reverse schedule and
records whether one of them fails (a wrong result, a deadlock report, a crash) or the two
schedules give different results (the digests of what the tests copy back differ, as the CTest
`*_schedules_agree` tests check): the deletion is then "caught". The deletion is done either

  * at run time (default): KFAC_KERNELS_CUDA_EMULATION_SKIP_BARRIER=FILE:LINE makes that barrier do
    nothing, which is what deleting the statement does, without recompiling; or
  * in the source (--source): a copy of the repository's csrc/ and CMakeLists.txt in a temporary
    directory gets the call deleted and the test rebuilt (slower: one rebuild per barrier).

The mutants are never written into the repository. Needs a build with
-DKFAC_KERNELS_CUDA_EMULATION=ON (--build-dir; default build/emu).

    python csrc/emulation/barrier_deletion.py --build-dir build/emu [--json out.json] [--source]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_frontend import code_mask  # noqa: E402

SCHEDULES = ("forward", "reverse")


def barrier_sites(cuda_dir: Path) -> list[tuple[str, int]]:
    """(path relative to the root, line) of every __syncthreads() call, comments excluded."""
    sites = []
    for cu in sorted([*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cuh")]):
        code = code_mask(cu.read_text())
        for m in re.finditer(r"\b__syncthreads\s*\(\s*\)", code):
            sites.append((cu.relative_to(ROOT).as_posix(), code.count("\n", 0, m.start()) + 1))
    return sites


def tests_for(build: Path, cu: str) -> list[Path]:
    """The emulated tests of a .cu file; for a shared .cuh header, those of every .cu file that
    includes it."""
    path = ROOT / cu
    if path.suffix == ".cuh":
        stems = [c.stem for c in sorted(path.parent.glob("*.cu"))
                 if f'"{path.name}"' in c.read_text()]
    else:
        stems = [path.stem]
    return sorted(p for stem in stems for p in build.glob(f"test_{stem}_cuda_emulated_sm*")
                  if os.access(p, os.X_OK))


FAILURE = re.compile(r"^FAIL|CUDA emulation: (deadlock|fault)|CUDA error|invalid memory access")


def run_one(exe: Path, schedule: str, env_extra: dict[str, str], digest: Path,
            timeout: float) -> str:
    """Runs one test binary; returns how it failed ('' when it passed). Stops it at its first
    failure."""
    env = dict(os.environ, KFAC_KERNELS_CUDA_EMULATION_SCHEDULE=schedule,
               KFAC_KERNELS_CUDA_EMULATION_DIGEST=str(digest), **env_extra)
    proc = subprocess.Popen([str(exe), "--quick"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    deadline = time.time() + timeout
    how = ""
    for line in proc.stdout:
        if FAILURE.search(line):
            how = "deadlock reported" if "deadlock" in line else line.strip()[:120]
            proc.kill()
            break
        if time.time() > deadline:
            how = f"timed out after {timeout:.0f} s"
            proc.kill()
            break
    rc = proc.wait()
    if not how and rc != 0:
        how = f"exit status {rc}"
    return how


def run_tests(exes: list[Path], env_extra: dict[str, str], timeout: float,
              workdir: Path) -> tuple[bool, str]:
    """(caught, how): a failing run, or results that differ between the schedules."""
    for exe in exes:
        digests = []
        for schedule in SCHEDULES:
            digest = workdir / f"{exe.name}.{schedule}.digest"
            digest.unlink(missing_ok=True)
            how = run_one(exe, schedule, env_extra, digest, timeout)
            if how:
                return True, f"{exe.name} {schedule}: {how}"
            digests.append(digest.read_text() if digest.exists() else "")
        if len(set(digests)) > 1:
            return True, f"{exe.name}: results differ between the schedules"
    return False, ""


def delete_call(text: str, line: int) -> str:
    lines = text.split("\n")
    new, n = re.subn(r"\b__syncthreads\s*\(\s*\)\s*;", "", lines[line - 1], count=1)
    if n != 1:
        raise SystemExit(f"no __syncthreads(); on line {line}")
    lines[line - 1] = new
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "emu")
    ap.add_argument("--source", action="store_true", help="delete in a copied source tree")
    ap.add_argument("--only", help="only sites whose file name contains this")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    ap.add_argument("--json", type=Path, help="write the table here")
    args = ap.parse_args(argv)

    sites = barrier_sites(ROOT / "csrc" / "cuda")
    if args.only:
        sites = [s for s in sites if args.only in s[0]]
    build = args.build_dir.resolve()
    tmp = None
    if args.source:
        tmp = Path(tempfile.mkdtemp(prefix="kfac-barrier-deletion-"))
        shutil.copytree(ROOT / "csrc", tmp / "csrc")
        shutil.copy(ROOT / "CMakeLists.txt", tmp / "CMakeLists.txt")
        build = tmp / "build"
        subprocess.run(["cmake", "-S", str(tmp), "-B", str(build), "-DKFAC_KERNELS_CUDA=OFF",
                        "-DKFAC_KERNELS_CUDA_EMULATION=ON", "-DCMAKE_BUILD_TYPE=Release"],
                       check=True, capture_output=True)

    workdir = Path(tempfile.mkdtemp(prefix="kfac-barrier-digests-"))
    rows = []
    for cu, line in sites:
        t0 = time.time()
        stem = Path(cu).stem
        if args.source:
            path = tmp / cu
            original = path.read_text()
            path.write_text(delete_call(original, line))
            targets = [f"test_{stem}_cuda_emulated_sm800"]
            if "__CUDA_ARCH__" in original:  # also built at sm_90 (emulation.cmake)
                targets.append(f"test_{stem}_cuda_emulated_sm900")
            try:
                subprocess.run(["cmake", "--build", str(build), "-j2", "--target", *targets],
                               check=True, capture_output=True)
                caught, how = run_tests(tests_for(build, cu), {}, args.timeout, workdir)
            finally:
                path.write_text(original)
        else:
            exes = tests_for(build, cu)
            if not exes:
                raise SystemExit(f"no emulated test for {cu} in {build}")
            caught, how = run_tests(
                exes, {"KFAC_KERNELS_CUDA_EMULATION_SKIP_BARRIER": f"{cu}:{line}"}, args.timeout,
                workdir)
        rows.append({"site": f"{cu}:{line}", "caught": caught, "by": how,
                     "seconds": round(time.time() - t0, 1)})
        print(f"{'caught    ' if caught else 'NOT CAUGHT'} {cu}:{line}  {how}", flush=True)

    caught = sum(r["caught"] for r in rows)
    print(f"{caught} of {len(rows)} barrier deletions caught "
          f"({'source' if args.source else 'run-time'} deletion, schedules {', '.join(SCHEDULES)})")
    if args.json:
        args.json.write_text(json.dumps({"mode": "source" if args.source else "run-time",
                                         "schedules": SCHEDULES, "caught": caught,
                                         "total": len(rows), "sites": rows}, indent=1) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
