"""Static performance model of the GPU kernels on an H100 (sm_90), made without a GPU.

    python bench/static_model.py            # compile, count, model; print the table and write
                                            # the sections below into bench/results/static_sm90.json

Three parts, each kept with its inputs in ``static_sm90.json`` (next to ``configs``, the Triton
register table of ``bench/triton_static.py``) so that a GPU run can put measurements beside them:

* ``cuda_kernels``: every kernel of ``csrc/cuda/*.cu`` compiled by nvcc for sm_90 (``-Xptxas
  -v``): registers, spills, stack, static shared memory; the SASS instruction mix from
  ``cuobjdump -sass`` (tensor-core HMMA / HGMMA (wgmma), FFMA, DFMA, shared and global loads and
  stores, asynchronous copies LDGSTS, barriers); the occupancy at 256 threads per block.
* ``triton_kernels_ptx``: the Triton configurations the launchers pick at the target shapes,
  compiled for sm_90: the PTX mix (``wgmma.mma_async``, ``mma.sync``, ``fma``, ``cp.async``),
  registers, spills, shared memory, occupancy.
* ``roofline``: per target (``patch_covariance`` expand at ResNet-50 stage 3, ``block_eigh`` at
  n = 64 / 96 / 128, the fused SINGD steps on ResNet-18's parameters): flops and bytes per launch,
  the math pipe the instruction mix uses, the time each limit gives, the predicted time and its
  ratio to the eager / cuBLAS / cuSOLVER alternative. The model's peak numbers and assumptions are
  in ``model``: every assumption is named there, to be checked by a GPU run.

The model is first-order: a kernel's time is the largest of its math, L2, DRAM and shared-memory
times when it overlaps loads with math (asynchronous copies or ``num_stages`` pipelining), their
sum when it does not (synchronous gathers: a block waits for its loads, then computes). For a
pipelined Triton kernel the math counts whole waves of programs, and the issue of its product
loop's SASS instructions (address arithmetic, masks, copies: what bounded the gathering kernels
on the H200, ``bench/results/static_vs_h200.json``) is one more limit.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "static_sm90.json"

# H100 SXM5 (80 GB), dense rates (NVIDIA H100 datasheet); the SM clock is the one at which
# 132 SMs x 4096 bf16 flop / clock give the datasheet's 989.4 TFLOP/s.
H100 = {
    "name": "H100 SXM5 80 GB",
    "sms": 132,
    "sm_clock_hz": 1.83e9,
    "bf16_tensor_flops": 989.4e12,
    "tf32_tensor_flops": 494.7e12,
    "fp32_ffma_flops": 66.9e12,
    "fp64_fma_flops": 33.5e12,
    "fp64_tensor_flops": 66.9e12,
    "hbm_bytes_per_s": 3.35e12,
    "shared_bytes_per_clock_per_sm": 128,
    "registers_per_sm": 65536,
    "shared_bytes_per_sm": 228 * 1024,
    "shared_reserved_per_block": 1024,
    "max_threads_per_sm": 2048,
    "issue_slots_per_clock_per_sm": 4,  # four schedulers, one warp instruction a clock each
    "max_blocks_per_sm": 32,
}
ASSUMPTIONS = {
    "l2_bytes_per_s": (10e12, "L2 read bandwidth, all SMs (not in the datasheet)"),
    "mma_sync_fraction": (0.62, "mma.sync (HMMA.16816) on sm_90 reaches this fraction of the "
                                "wgmma tensor-core rate"),
    "cublas_fraction": (0.75, "cuBLAS GEMM at these shapes: fraction of the tensor-core peak"),
    "kernel_launch_s": (3e-6, "one kernel launch in a stream"),
    "eager_op_s": (6e-6, "one eager PyTorch op (Python, dispatch, launch) when the GPU is not "
                         "the limit"),
    "op_call_host_s": (21e-6, "one call of a kfac_kernels op from Python on a GPU machine's "
                              "host (checks, torch.library dispatch, launch): the H200's host "
                              "measured 21.3 us per layer of the per-layer fused SINGD step "
                              "(static_vs_h200.json)"),
    "foreach_entry_host_s": (0.8e-6, "an entry of a list argument of a native op (the "
                                     "dispatcher and the glue's checks): 0.8 us per entry "
                                     "measured on this CPU (torch.ops alone, 21-42 entries)"),
    "eigh_per_matrix_s": (1.5e-4, "torch.linalg.eigh per matrix for 32 < n <= 128 (cuSOLVER's "
                                  "batched Jacobi serves n <= 32; larger matrices one by one)"),
    "jacobi_sweeps": (8, "Jacobi sweeps to tol = eps at n = 64..128 (fp32)"),
    "barrier_latency_clocks": (40, "one __syncthreads plus the dependent shared load after it"),
}


def _a(name: str) -> float:
    return ASSUMPTIONS[name][0]


# ---------------------------------------------------------------------------------------------
# CUDA kernels: ptxas report and SASS mix

_SASS_GROUPS = {
    "HGMMA": ("HGMMA",), "HMMA": ("HMMA",), "FFMA": ("FFMA",), "FMUL_FADD": ("FMUL", "FADD"),
    "DFMA": ("DFMA",), "DMUL_DADD": ("DMUL", "DADD"), "LDS": ("LDS", "LDSM"), "STS": ("STS",),
    "LDG": ("LDG",), "STG": ("STG",), "LDGSTS": ("LDGSTS",), "TMA": ("UTMALDG", "UBLKCP"),
    "BAR": ("BAR",), "SHFL": ("SHFL",),
}


def _tool(name: str) -> str:
    """A CUDA tool from PATH, the toolkit next to nvcc, or Triton's bundled copies."""
    import shutil

    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(os.path.realpath(nvcc)).parent
        candidates += [real / name, Path("/usr/local/cuda/bin") / name]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c.exists():
            return str(c)
    raise FileNotFoundError(f"{name} not found (needed for the SASS mix)")


def _demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    pretty = out.stdout.splitlines() if out.returncode == 0 else names
    short = {}
    for mangled, p in zip(names, pretty):
        p = re.sub(r"\(anonymous namespace\)::|kfac_kernels::|cuda::", "", p)
        short[mangled] = re.sub(r"^void ", "", re.sub(r"\(.*\)$", "", p).strip())
    return short


def cuda_kernels(arch: int = 90) -> list[dict]:
    """Per kernel of csrc/cuda/*.cu: ptxas resources and the SASS instruction mix."""
    rows = []
    cuobjdump = _tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            cubin = Path(tmp) / (cu.stem + ".cubin")
            done = subprocess.run(["nvcc", "-cubin", "-std=c++17", f"-I{ROOT}/csrc/include",
                                   f"-arch=sm_{arch}", "-Xptxas", "-v", str(cu), "-o", str(cubin)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {cu.name}:\n{done.stderr[-2000:]}")
            report = _ptxas_report(done.stderr)
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
            mix = _sass_mix(sass)
            loops = {name: main_loop(text) for name, text in _sass_functions(sass).items()}
            names = _demangle(list(report))
            for mangled, res in report.items():
                row = {"file": f"csrc/cuda/{cu.name}", "kernel": names[mangled], **res,
                       "sass": mix.get(mangled, {}), "sass_main_loop": loops.get(mangled, {})}
                # static shared memory only: block_eigh's dynamic share is in its roofline rows
                row["occupancy_blocks_per_sm"] = occupancy(res["registers"], 256,
                                                           res["shared_static_bytes"])
                rows.append(row)
    return rows


def _ptxas_report(text: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for", line)
        if m:
            current = m.group(1)
            out[current] = {"registers": None, "spill_store_bytes": 0, "spill_load_bytes": 0,
                            "stack_frame_bytes": 0, "shared_static_bytes": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m:
            out[current].update(stack_frame_bytes=int(m.group(1)),
                                spill_store_bytes=int(m.group(2)),
                                spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[current]["shared_static_bytes"] = int(s.group(1)) if s else 0
    return out


def _sass_functions(sass: str) -> dict[str, str]:
    """The listing of each function of a ``cuobjdump -sass`` output."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current:
            out[current].append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def _sass_mix(sass: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    current = None
    counts: Counter = Counter()
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            if current:
                out[current] = dict(counts)
            current, counts = m.group(1), Counter()
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and current:
            op = m.group(1)
            counts["instructions"] += 1
            for group, prefixes in _SASS_GROUPS.items():
                if any(op == p or op.startswith(p + "_") for p in prefixes):
                    counts[group] += 1
    if current:
        out[current] = dict(counts)
    return out


def main_loop(sass: str) -> dict:
    """The product loop of a one-kernel SASS listing (the shortest loop, between a backward
    branch and its target, that holds tensor-core instructions; else the shortest that loads
    from global memory; else the shortest loop): its
    instructions per iteration (per warp), and among them the tensor-core (HGMMA / HMMA) and
    asynchronous-copy (LDGSTS) ones."""
    ins = [(int(m.group(1), 16), m.group(2)) for line in sass.splitlines()
           if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line))]
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA (?:`\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append([t for a, t in ins if int(m.group(1), 16) <= a <= addr])
    if not loops:
        return {}
    # the innermost loop holding tensor-core work (the product loop), else the innermost one
    # that loads from global memory (not a set-up loop over shared tables), else the innermost
    with_mma = [b for b in loops if any(re.search(r"\bH[G]?MMA", t) for t in b)]
    loading = [b for b in loops if any(re.search(r"\bLDG", t) for t in b)]
    body = min(with_mma or loading or loops, key=len)
    return {"instructions": len(body),
            "tensor_core": sum(bool(re.search(r"\bH[G]?MMA", t)) for t in body),
            "async_copies": sum("LDGSTS" in t for t in body)}


def occupancy(registers: int | None, threads: int, shared_bytes: int) -> int | None:
    """Blocks per SM from registers (allocated per warp in units of 256), threads, shared memory
    (None when the register count is unknown)."""
    if registers is None:
        return None
    warps = threads // 32
    by_threads = H100["max_threads_per_sm"] // threads
    regs = max(registers, 1)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = H100["registers_per_sm"] // (per_warp * warps)
    per_block = shared_bytes + H100["shared_reserved_per_block"]
    by_shared = H100["shared_bytes_per_sm"] // per_block
    return max(0, min(by_threads, by_regs, by_shared, H100["max_blocks_per_sm"]))


# ---------------------------------------------------------------------------------------------
# Triton kernels: PTX mix at the configurations picked for the targets

_PTX_GROUPS = {"wgmma": r"wgmma\.mma_async", "mma_sync": r"\bmma\.sync", "fma_f32": r"fma\.rn\.f32",
               "fma_f64": r"fma\.rn\.f64", "cp_async": r"cp\.async", "ld_global": r"ld\.global",
               "ld_shared": r"ld\.shared|ldmatrix", "st_shared": r"st\.shared",
               "bar_sync": r"bar\.sync|barrier\.sync"}


def _triton_targets():
    """(name, config) of the launch configurations at the target shapes: the largest tiles (what
    D = 2304 and the SINGD layers pick), fp32 products both in full precision and on TF32."""
    sys.path.insert(0, str(ROOT))
    from kfac_kernels._triton import _aot

    want = {
        "patch_covariance expand bf16": ("_pc_expand_kernel", "x_ptr=bf16", "BLOCK=64,",
                                         "HAS_FACTOR=0", "SPLIT=0"),
        "patch_covariance expand fp32 (ieee)": ("_pc_expand_kernel", "x_ptr=fp32", "BLOCK=64,",
                                                "HAS_FACTOR=0", "SPLIT=0", "IEEE_DOT=1"),
        "patch_covariance expand fp32 (tf32)": ("_pc_expand_kernel", "x_ptr=fp32", "BLOCK=64,",
                                                "HAS_FACTOR=0", "SPLIT=0", "IEEE_DOT=0"),
        "patch_covariance expand bf16 (channels)": ("_pc_expand_channels_kernel", "BLOCK=128,",
                                                    "x_ptr=bf16", "HAS_BIAS=0", "RAW=0"),
        "patch_covariance expand fp32 (tf32, channels)": ("_pc_expand_channels_kernel",
                                                          "BLOCK=128,", "x_ptr=fp32",
                                                          "HAS_BIAS=0", "RAW=0"),
        "patch_covariance expand bf16 (channels, 64 wide)": ("_pc_expand_channels_kernel",
                                                             "BLOCK=64,", "x_ptr=bf16",
                                                             "HAS_BIAS=0", "RAW=0"),
        "patch_covariance reduce mean fp32": ("_pc_mean_kernel", "x_ptr=fp32"),
        "patch_covariance reduce mean bf16": ("_pc_mean_kernel", "x_ptr=bf16"),
        "symmetric_factor_update fp32 (reduce Gram)": ("_sfu_kernel", "x_ptr=fp32", "BLOCK=64,",
                                                       "HAS_FACTOR=0", "SPLIT=0"),
        "block_eigh n<=64 fp32": ("_block_eigh_kernel", "NP=64", "a_ptr=fp32"),
        "singd_diagonal_step fp32": ("singd_diagonal_step", "FIRST=0", "DECAY=1", "p_ptr=fp32"),
        "singd_block_step 32x32 fp32": ("singd_block_step", "BLOCK_C=32,BLOCK_K=32",
                                        "PARAM_BF16=0", "w_ptr=fp32"),
    }
    configs = _aot.all_configs()
    out = []
    for name, parts in want.items():
        for cfg in configs:
            if all(p in cfg.key() for p in parts):
                out.append((name, cfg))
                break
    return out


def triton_kernels_ptx(arch: int = 90) -> list[dict]:
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    rows = []
    for name, cfg in _triton_targets():
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=cfg.kernel, signature=cfg.signature(),
                          constexprs=cfg.all_constexprs(), attrs=cfg.attrs()),
                target=GPUTarget("cuda", arch, 32), options=cfg.options())
        ptx = compiled.asm["ptx"]
        text = log.getvalue()
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
        res = {key: int(m.group(1)) if (m := re.search(pattern, text)) else None
               for key, pattern in (("registers", r"Used (\d+) registers"),
                                    ("spill_store_bytes", r"(\d+) bytes spill stores"))}
        shared = int(compiled.metadata.shared)
        rows.append({"target": name, "config": cfg.key(), "num_warps": cfg.num_warps,
                     "registers": res.get("registers"),
                     "spill_store_bytes": res.get("spill_store_bytes"),
                     "shared_bytes": shared,
                     "occupancy_blocks_per_sm": occupancy(res.get("registers"),
                                                          32 * cfg.num_warps, shared),
                     "ptx": {g: len(re.findall(p, ptx)) for g, p in _PTX_GROUPS.items()},
                     "sass_main_loop": main_loop(sass)})
    return rows


# ---------------------------------------------------------------------------------------------
# Roofline of the targets

def _pipe_rate(pipe: str) -> float:
    return {"wgmma_bf16": H100["bf16_tensor_flops"],
            "mma_sync_bf16": H100["bf16_tensor_flops"] * _a("mma_sync_fraction"),
            "wgmma_tf32": H100["tf32_tensor_flops"],
            "ffma_fp32": H100["fp32_ffma_flops"], "dfma_fp64": H100["fp64_fma_flops"]}[pipe]


def _limits(flops, pipe, l2_bytes, hbm_bytes, overlapped):
    t_math = flops / _pipe_rate(pipe)
    t_l2 = l2_bytes / _a("l2_bytes_per_s")
    t_hbm = hbm_bytes / H100["hbm_bytes_per_s"]
    t = max(t_math, t_l2, t_hbm) if overlapped else t_math + max(t_l2, t_hbm)
    limit = max((("math", t_math), ("L2", t_l2), ("DRAM", t_hbm)), key=lambda kv: kv[1])[0]
    return {"t_math_s": t_math, "t_l2_s": t_l2, "t_dram_s": t_hbm, "predicted_s": t,
            "limited_by": limit if overlapped else f"math + {limit if limit != 'math' else 'L2'}"
                                                   " (not overlapped)"}


def _pipelined_limits(pipe, l2_bytes, hbm_bytes, *, ctas, occupancy_, iterations,
                      flops_per_iteration, warps, loop_instructions):
    """Limits of a kernel that overlaps its loads with its math, counted on the busiest SM,
    which runs ``ceil(programs / SMs)`` programs (in waves of ``occupancy`` at a time; the
    SM's math pipe and its schedulers are shared by the programs it holds, so occupancy hides
    latency but adds no throughput): the math of those programs; the issue of their product
    loops' instructions (every warp's instructions through the SM's four schedulers: address
    arithmetic, masks and copies are issued beside the asynchronous tensor-core
    instructions); L2 and DRAM bytes."""
    waves = math.ceil(ctas / (H100["sms"] * occupancy_))
    per_sm = math.ceil(ctas / H100["sms"])
    per_sm_rate = _pipe_rate(pipe) / H100["sms"]
    t_math = per_sm * iterations * flops_per_iteration / per_sm_rate
    t_issue = (per_sm * iterations * warps * loop_instructions
               / (H100["issue_slots_per_clock_per_sm"] * H100["sm_clock_hz"]))
    t_l2 = l2_bytes / _a("l2_bytes_per_s")
    t_hbm = hbm_bytes / H100["hbm_bytes_per_s"]
    times = {"math": t_math, "issue": t_issue, "L2": t_l2, "DRAM": t_hbm}
    return {"t_math_s": t_math, "t_issue_s": t_issue, "t_l2_s": t_l2, "t_dram_s": t_hbm,
            "waves": waves, "predicted_s": max(times.values()),
            "limited_by": max(times, key=times.get)}


def patch_covariance_expand(mix: dict, triton_rows: list[dict]) -> list[dict]:
    """ResNet-50 stage 3: N = 64, C = 256, 14 x 14, k = 3, stride 1, padding 1.

    Per kernel, from its tiling: the generic kernels (CUDA, Triton) tile the columns in the
    output's order, 64 wide; the Triton channels kernel 128 wide, a kernel offset and 128
    channels per tile (``T = k^2 ceil(C / 128)`` tiles), after one channels-last copy of an NCHW
    input (read and written once more from DRAM). Each computes the upper tile pairs, and reads
    two gathered ``rows x tile`` panels per pair from L2."""
    n, c, h, w, k = 64, 256, 14, 14, 3
    m, d = n * h * w, c * k * k
    out = []
    for dtype, elem in (("bf16", 2), ("fp32", 4)):
        input_bytes = n * c * h * w * elem
        eager_flops = 2 * m * d * d                       # X^T X, both triangles
        unfold_bytes = input_bytes + 2 * m * d * elem
        tensor_rate = (H100["bf16_tensor_flops"] if dtype == "bf16"
                       else H100["tf32_tensor_flops"])

        def eager_s(pipe):  # cuBLAS in the kernel's precision: bf16, TF32 or full fp32
            rate = H100["fp32_ffma_flops"] if pipe == "ffma_fp32" else (
                H100["tf32_tensor_flops"] if pipe == "wgmma_tf32" else H100["bf16_tensor_flops"])
            return (unfold_bytes / H100["hbm_bytes_per_s"]
                    + eager_flops / (rate * _a("cublas_fraction")) + 2 * _a("eager_op_s"))
        # (name, pipe, overlapped loads, tiles per side, tile width, extra DRAM bytes)
        generic_tiles = math.ceil(d / 64)
        channels_tiles = k * k * math.ceil(c / 128)
        copy_bytes = 2 * input_bytes  # the channels-last copy: read and write
        kernels = []
        cuda_mix = mix.get(f"pc_tile_kernel<{'__nv_bfloat16' if dtype == 'bf16' else 'float'}"
                           f", false>", {})
        cuda_pipe = ("mma_sync_bf16" if cuda_mix.get("HMMA") else
                     "ffma_fp32") if dtype == "bf16" else "ffma_fp32"
        kernels.append(("cuda pc_tile_kernel", cuda_pipe, bool(cuda_mix.get("LDGSTS")),
                        generic_tiles, 64, 0))

        def ptx(name):
            return next((r["ptx"] for r in triton_rows if r["target"] == name), {})

        def triton_row(name):
            return next((r for r in triton_rows if r["target"] == name), None)
        if dtype == "bf16":
            mix_ = ptx("patch_covariance expand bf16")
            kernels.append(("triton _pc_expand_kernel", "wgmma_bf16" if mix_.get("wgmma")
                            else "mma_sync_bf16", bool(mix_.get("cp_async")), generic_tiles,
                            64, 0))
            mix_ = ptx("patch_covariance expand bf16 (channels)")
            kernels.append(("triton _pc_expand_channels_kernel", "wgmma_bf16"
                            if mix_.get("wgmma") else "mma_sync_bf16",
                            bool(mix_.get("cp_async")), channels_tiles, 128, copy_bytes,
                            triton_row("patch_covariance expand bf16 (channels)")))
        else:
            mix_ = ptx("patch_covariance expand fp32 (ieee)")
            kernels.append(("triton _pc_expand_kernel", "ffma_fp32", bool(mix_.get("cp_async")),
                            generic_tiles, 64, 0))
            mix_ = ptx("patch_covariance expand fp32 (tf32)")
            kernels.append(("triton _pc_expand_kernel, TF32 (allow_tf32)",
                            "wgmma_tf32" if mix_.get("wgmma") else "ffma_fp32",
                            bool(mix_.get("cp_async")), generic_tiles, 64, 0))
            mix_ = ptx("patch_covariance expand fp32 (tf32, channels)")
            kernels.append(("triton _pc_expand_channels_kernel, TF32 (allow_tf32)",
                            "wgmma_tf32" if mix_.get("wgmma") else "ffma_fp32",
                            bool(mix_.get("cp_async")), channels_tiles, 128, copy_bytes,
                            triton_row("patch_covariance expand fp32 (tf32, channels)")))
        for name, pipe, overlapped, tiles, block, extra, *row in kernels:
            upper = tiles * (tiles + 1) // 2
            flops = 2 * m * block * block * upper         # the upper tiles the kernel computes
            gather_l2 = upper * 2 * m * block * elem       # two gathered panels per tile pair
            hbm = input_bytes + d * d * 4 + extra          # input once, fp32 factor written
            row = row[0] if row else None
            if overlapped and row and row.get("sass_main_loop"):
                step = int(re.search(r"BLOCK_K=(\d+)", row["config"]).group(1))
                lim = _pipelined_limits(
                    pipe, gather_l2, hbm, ctas=upper, occupancy_=row["occupancy_blocks_per_sm"],
                    iterations=math.ceil(m / step), flops_per_iteration=2 * step * block * block,
                    warps=row["num_warps"],
                    loop_instructions=row["sass_main_loop"]["instructions"])
            else:
                lim = _limits(flops, pipe, gather_l2, hbm, overlapped)
            out.append({
                "target": f"patch_covariance expand {dtype}, ResNet-50 stage 3 "
                          f"(N={n}, C={c}, {h}x{w}, k={k}): rows {m}, D {d}",
                "kernel": name, "pipe": pipe, "tile": block, "flops": flops,
                "l2_bytes": gather_l2, "dram_bytes": hbm, "overlapped_loads": overlapped,
                **lim,
                "fraction_of_tensor_peak": flops / lim["predicted_s"] / tensor_rate,
                "eager": "unfold + cuBLAS X^T X (full product, same precision)",
                "eager_s": eager_s(pipe), "ratio_vs_eager": eager_s(pipe) / lim["predicted_s"]})
    return out


def patch_covariance_blocks(triton_rows: list[dict]) -> list[dict]:
    """Four diagonal blocks of 64 channels at ResNet-50 stage 3 (N = 64, C = 256, 14 x 14, k = 3;
    ``num_blocks=4``: four segments of 64 channels, D = 576 each), bf16: the Triton channels
    kernel at its 64-wide tiles (a kernel offset and the segment's 64 channels per tile, 9 tiles
    and 45 tile pairs per segment, after one channels-last copy of the NCHW input), pipelined as
    in ``patch_covariance_expand``. The eager op: one unfold, then per block the copy of its
    rows, one cuBLAS product, the scaling; the stack of the four."""
    row = next((r for r in triton_rows
                if r["target"] == "patch_covariance expand bf16 (channels, 64 wide)"), None)
    if row is None or not row.get("sass_main_loop"):
        return []
    n, c, h, w, k, blocks, elem = 64, 256, 14, 14, 3, 4, 2
    m, cs = n * h * w, c // blocks
    d = cs * k * k
    block = int(re.search(r"BLOCK=(\d+),", row["config"]).group(1))
    step = int(re.search(r"BLOCK_K=(\d+)", row["config"]).group(1))
    tiles = k * k * math.ceil(cs / block)
    pairs = blocks * tiles * (tiles + 1) // 2
    input_bytes = n * c * h * w * elem
    l2 = pairs * 2 * m * block * elem
    hbm = 3 * input_bytes + blocks * d * d * 4       # input, its channels-last copy, factors
    lim = _pipelined_limits("wgmma_bf16" if row["ptx"].get("wgmma") else "mma_sync_bf16", l2,
                            hbm, ctas=pairs, occupancy_=row["occupancy_blocks_per_sm"],
                            iterations=math.ceil(m / step),
                            flops_per_iteration=2 * step * block * block,
                            warps=row["num_warps"],
                            loop_instructions=row["sass_main_loop"]["instructions"])
    flops = pairs * 2 * m * block * block
    unfolded = m * c * k * k * elem
    eager_bytes = (input_bytes + unfolded            # unfold (the padding in the same pass)
                   + 2 * unfolded                    # each block's rows copied contiguous
                   + blocks * (d * d * elem + 2 * d * d * elem)  # product out, scaled
                   + 2 * blocks * d * d * elem)      # stack
    eager_flops = blocks * 2 * m * d * d
    eager = (eager_bytes / H100["hbm_bytes_per_s"]
             + eager_flops / (H100["bf16_tensor_flops"] * _a("cublas_fraction"))
             + 2 * _a("eager_op_s"))                 # as the expand rows count it
    return [{
        "target": f"patch_covariance expand bf16, {blocks} diagonal blocks, ResNet-50 stage 3 "
                  f"(N={n}, C={c}, {h}x{w}, k={k}): rows {m}, D {d} per block",
        "kernel": f"triton _pc_expand_channels_kernel ({block}-wide tiles)", "pipe":
        "wgmma_bf16" if row["ptx"].get("wgmma") else "mma_sync_bf16", "tile": block,
        "flops": flops, "l2_bytes": l2, "dram_bytes": hbm, "overlapped_loads": True,
        "programs": pairs, **lim,
        "fraction_of_tensor_peak": flops / lim["predicted_s"] / H100["bf16_tensor_flops"],
        "eager": "unfold, per block a row copy, cuBLAS X^T X and the scaling, stack",
        "eager_dram_bytes": eager_bytes, "eager_s": eager,
        "ratio_vs_eager": eager / lim["predicted_s"]}]


def patch_covariance_reduce(triton_rows: list[dict], cuda_rows: list[dict]) -> list[dict]:
    """Reduce at ResNet-50 stage 3 (N = 64, C = 256, 14 x 14, k = 3): the Triton mean kernel
    (each input element read once, the window sums a product with 0/1 indicators; fp32 dot with
    16 offset columns, 9 used) writes ``abar`` (N, D) in fp32, then the symmetric factor update
    kernel forms the upper 64 x 64 tiles of ``abar^T abar`` (K = N = 64) and writes both
    triangles of the fp32 factor. Two launches. The eager op (``backend="eager"``): pad, unfold,
    mean over the positions, the ones column, one full cuBLAS product, the scaling and the stack
    of the segments, each a pass over its tensor in DRAM."""
    n, c, h, w, k = 64, 256, 14, 14, 3
    d = c * k * k + 1                                 # with the bias coordinate
    launch = _a("kernel_launch_s")

    def row(name):
        return next((r for r in triton_rows if r["target"] == name), None)
    gram = row("symmetric_factor_update fp32 (reduce Gram)")
    out = []
    for dtype, elem in (("fp32", 4), ("bf16", 2)):
        mean = row(f"patch_covariance reduce mean {dtype}")
        if mean is None or gram is None:
            continue
        block_c, block_x, block_t = (int(re.search(rf"{key}=(\d+)", mean["config"]).group(1))
                                     for key in ("BLOCK_C", "BLOCK_X", "BLOCK_T"))
        input_bytes = n * c * h * w * elem
        abar_bytes = n * d * 4
        programs = n * math.ceil(c / block_c) * math.ceil(k * k / block_t)
        mean_lim = _pipelined_limits(
            "ffma_fp32", input_bytes, input_bytes + abar_bytes, ctas=programs,
            occupancy_=mean["occupancy_blocks_per_sm"],
            iterations=h * math.ceil(w / block_x),       # a row chunk per step
            flops_per_iteration=2 * block_c * block_x * block_t, warps=mean["num_warps"],
            loop_instructions=mean["sass_main_loop"]["instructions"])
        tiles = math.ceil(d / 64)
        upper = tiles * (tiles + 1) // 2
        gram_flops = 2 * n * 64 * 64 * upper
        gram_l2 = upper * 2 * n * 64 * 4             # two (N x 64) fp32 panels per tile pair
        gram_lim = _limits(gram_flops, "ffma_fp32", gram_l2, abar_bytes + d * d * 4,
                           bool(gram["ptx"].get("cp_async")))
        predicted = mean_lim["predicted_s"] + gram_lim["predicted_s"] + 2 * launch
        cuda = cuda_reduce(cuda_rows, dtype, n, c, h, w, input_bytes + n * (d - 1) * 4,
                           gram_flops, gram_l2, abar_bytes + d * d * 4)
        # the eager op, pass by pass (bytes read + written)
        unfolded = n * (d - 1) * h * w * elem
        eager_bytes = (2 * input_bytes                  # F.pad
                       + input_bytes + unfolded        # F.unfold
                       + unfolded + n * (d - 1) * elem  # mean over the positions
                       + 2 * n * d * elem              # the ones column (torch.cat)
                       + 2 * n * d * elem + d * d * elem  # cuBLAS X^T X
                       + 2 * d * d * elem              # alpha *
                       + 2 * d * d * elem)             # torch.stack of the segments
        rate = H100["fp32_ffma_flops"] if dtype == "fp32" else H100["bf16_tensor_flops"]
        eager_flops = 2 * n * d * d
        eager = (eager_bytes / H100["hbm_bytes_per_s"]
                 + eager_flops / (rate * _a("cublas_fraction")) + 2 * _a("eager_op_s"))
        out.append({
            "target": f"patch_covariance reduce {dtype}, ResNet-50 stage 3 (N={n}, C={c}, "
                      f"{h}x{w}, k={k}): D {d}",
            "kernel": "triton _pc_mean_kernel (input read once) + _sfu_kernel (Gram)",
            "mean_programs": programs, "mean_dram_bytes": input_bytes + abar_bytes,
            "mean_t_dram_s": mean_lim["t_dram_s"], "mean_t_issue_s": mean_lim["t_issue_s"],
            "mean_t_math_s": mean_lim["t_math_s"], "mean_waves": mean_lim["waves"],
            "mean_predicted_s": mean_lim["predicted_s"],
            "mean_limited_by": mean_lim["limited_by"],
            "mean_before_l2_bytes": n * (d - 1) * h * w * elem,
            "gram_flops": gram_flops, "gram_l2_bytes": gram_l2,
            "gram_dram_bytes": abar_bytes + d * d * 4, "gram_t_math_s": gram_lim["t_math_s"],
            "gram_t_dram_s": gram_lim["t_dram_s"], "gram_predicted_s": gram_lim["predicted_s"],
            "gram_limited_by": gram_lim["limited_by"], "launches": 2,
            "predicted_s": predicted,
            "limited_by": f"mean {mean_lim['limited_by']} + Gram {gram_lim['limited_by']} "
                          f"+ 2 launches",
            "eager": "pad, unfold, mean, cat, cuBLAS X^T X, scale, stack (each a DRAM pass)",
            "eager_dram_bytes": eager_bytes, "eager_s": eager,
            "ratio_vs_eager": eager / predicted})
        if cuda:
            out.append({**out[-1], "kernel": "cuda pc_mean_plane_kernel (a warp per plane) + "
                                             "pc_tile_kernel (Gram)", **cuda,
                        "ratio_vs_eager": eager / cuda["predicted_s"]})
            for key in [k for k in out[-1] if k.startswith("mean_") and k not in cuda]:
                del out[-1][key]
    return out


def cuda_reduce(cuda_rows, dtype, n, c, h, w, mean_bytes, gram_flops, gram_l2, gram_bytes):
    """The CUDA reduce pass at the same layer: a warp per (n, channel) plane reads each pixel once
    (lanes over pixels: the pixel loop's SASS instructions a step, then a shuffle reduction of 16
    sums, 5 shuffles and 5 adds each, and the stores), then the synchronous FFMA tile kernel on
    the fp32 mean patches (math, then its L2 panels or the DRAM factor write: not overlapped)."""
    in_type = {"fp32": "float", "bf16": "__nv_bfloat16"}[dtype]
    mean = next((r for r in cuda_rows
                 if r["kernel"] == f"pc_mean_plane_kernel<{in_type}, true>"), None)
    gram = next((r for r in cuda_rows if r["kernel"].startswith("pc_tile_kernel<float")), None)
    if mean is None or gram is None or not mean.get("sass_main_loop"):
        return None
    warps = n * c
    per_warp = (math.ceil(h * w / 32) * mean["sass_main_loop"]["instructions"] + 16 * 10 + 16)
    t_issue = warps * per_warp / (H100["sms"] * H100["issue_slots_per_clock_per_sm"]
                                  * H100["sm_clock_hz"])
    t_dram = mean_bytes / H100["hbm_bytes_per_s"]
    mean_s = max(t_issue, t_dram)
    gram_lim = _limits(gram_flops, "ffma_fp32", gram_l2, gram_bytes, False)
    return {"mean_warps": warps, "mean_instructions_per_warp": per_warp,
            "mean_dram_bytes": mean_bytes, "mean_t_issue_s": t_issue, "mean_t_dram_s": t_dram,
            "mean_predicted_s": mean_s,
            "mean_limited_by": "issue" if t_issue >= t_dram else "DRAM",
            "gram_t_math_s": gram_lim["t_math_s"], "gram_t_dram_s": gram_lim["t_dram_s"],
            "gram_predicted_s": gram_lim["predicted_s"], "gram_limited_by": gram_lim["limited_by"],
            "predicted_s": mean_s + gram_lim["predicted_s"] + 2 * _a("kernel_launch_s"),
            "limited_by": f"mean {'issue' if t_issue >= t_dram else 'DRAM'} + Gram "
                          f"{gram_lim['limited_by']} + 2 launches"}


def block_eigh_rows(cuda_rows: list[dict], banks: dict) -> list[dict]:
    """The CUDA Jacobi kernel per round: shared-memory traffic of steps 2-4, four barriers; and
    the same model of the kernel before its rows were padded (the accesses' wavefronts from the
    bank table, V^T in global memory through L2, five barriers)."""
    regs = {r["kernel"]: r["registers"] for r in cuda_rows}
    out = []
    for n in (64, 96, 128):
        for batch in (64, 1024):
            np_, elem = n + (n & 1), 4
            half, ld = np_ // 2, np_ + 1
            # bytes per round: step 2 (A, 2 loads + 2 stores), step 3 (A and V^T in double),
            # step 4 (lower half: 2 loads + 2 stores), per-pair and table traffic (small)
            smem = (np_ * half * 4 * elem + np_ * half * 4 * (elem + 8)
                    + np_ * np_ // 2 * 4 * elem + np_ * 40)
            rounds = (np_ - 1) * _a("jacobi_sweeps")
            shared_v = _shared_bytes(np_, elem, True) <= 227 * 1024
            kernel = f"block_eigh_kernel<float, {'true' if shared_v else 'false'}>"
            per_block_smem = _shared_bytes(np_, elem, shared_v)
            blocks_per_sm = occupancy(regs.get(kernel), 256, per_block_smem)
            clk = H100["sm_clock_hz"]
            round_clocks = smem / H100["shared_bytes_per_clock_per_sm"]
            # throughput: all blocks share the SMs' shared-memory bandwidth; latency: one block's
            # rounds with their barriers when there are fewer blocks than SM slots
            t_throughput = batch * rounds * round_clocks / H100["sms"] / clk
            waves = math.ceil(batch / (H100["sms"] * max(blocks_per_sm, 1)))
            t_latency = waves * rounds * (round_clocks + 4 * _a("barrier_latency_clocks")) / clk
            predicted = max(t_throughput, t_latency)
            # before: step 2 (A), step 3 (A; V in global memory), step 4 (the transposed half),
            # each access's bytes times its mean ways
            ways = {k: v["mean_ways"] for k, v in banks["before"]["float32"][str(n)].items()}
            smem_before = (np_ * half * 4 * elem * ways["2 A[i][p], A[i][q]"]
                           + np_ * half * 4 * elem * ways["3 A[p][j], A[q][j]"]
                           + np_ * np_ // 2 * 2 * elem
                           + np_ * np_ // 2 * 2 * elem * ways["4 A[j][i] (transposed)"])
            clocks_before = smem_before / H100["shared_bytes_per_clock_per_sm"]
            v_l2 = np_ * half * 4 * 8
            before_blocks = occupancy(regs.get(kernel), 256, np_ * np_ * elem + 8 * np_ + 64)
            t_before = max(batch * rounds * clocks_before / H100["sms"] / clk,
                           batch * rounds * v_l2 / _a("l2_bytes_per_s"),
                           math.ceil(batch / (H100["sms"] * max(before_blocks, 1))) * rounds
                           * (clocks_before + 5 * _a("barrier_latency_clocks")) / clk)
            eager = batch * _a("eigh_per_matrix_s")
            out.append({"target": f"block_eigh fp32, n = {n}, B = {batch}", "kernel": kernel,
                        "eigenvectors_in_shared": shared_v, "shared_bytes_per_block":
                        per_block_smem, "blocks_per_sm": blocks_per_sm,
                        "shared_bytes_per_round": smem, "rounds": rounds,
                        "t_shared_throughput_s": t_throughput, "t_latency_s": t_latency,
                        "predicted_s": predicted,
                        "limited_by": "shared-memory bandwidth" if t_throughput >= t_latency
                        else "round latency (barriers)",
                        "predicted_before_padding_s": t_before,
                        "speedup_over_before": t_before / predicted,
                        "eager": "torch.linalg.eigh", "eager_s": eager,
                        "ratio_vs_eager": eager / predicted})
    return out


def _shared_bytes(np_: int, elem: int, shared_v: bool) -> int:
    """shared_bytes<T> of csrc/cuda/block_eigh.cu."""
    ld = np_ + 1
    return 8 * (np_ + 8 + (np_ * ld if shared_v else 0)) + 4 * 2 * np_ + elem * (
        4 * np_ + np_ // 2 + np_ * ld)


# ResNet-18 (ImageNet): (rows, cols) of every conv / linear weight, cols = C_in k^2 (+1 bias).
RESNET18 = ([(64, 147)] + [(64, 576)] * 4 + [(128, 576), (128, 1152), (128, 1152), (128, 1152),
            (128, 64)] + [(256, 1152), (256, 2304), (256, 2304), (256, 2304), (256, 128)]
            + [(512, 2304), (512, 4608), (512, 4608), (512, 4608), (512, 256)] + [(1000, 513)])


def singd_steps() -> list[dict]:
    """The fused parameter steps against the eager step, per optimizer step over ResNet-18."""
    params = sum(r * c for r, c in RESNET18)
    layers = len(RESNET18)
    out = []
    # diagonal: read p, g, b, write p, b (fp32); eager: the reference of
    # ops/singd_diagonal_step.py (fp32, weight decay, not the first step) is 11 elementwise
    # kernels, counted at two reads and one write each
    fused_bytes, eager_ops = 5 * 4 * params, 11
    eager_bytes = eager_ops * 3 * 4 * params
    fused = fused_bytes / H100["hbm_bytes_per_s"] + layers * _a("kernel_launch_s")
    eager = eager_bytes / H100["hbm_bytes_per_s"] + layers * eager_ops * _a("eager_op_s")
    out.append({"target": f"singd_diagonal_step fp32, ResNet-18 ({params} parameters, "
                          f"{layers} layers)", "kernel": "fused step (cuda / triton)",
                "dram_bytes": fused_bytes, "launches": layers, "predicted_s": fused,
                "limited_by": "DRAM + launches", "eager": f"{eager_ops} elementwise ops per "
                "layer", "eager_dram_bytes": eager_bytes, "eager_s": eager,
                "ratio_vs_eager": eager / fused})
    # the same step as one call of singd_diagonal_step_foreach, with the host's time counted:
    # one call of the op per layer (as the H200 measured the per-layer op) against one call
    # plus each entry's marshalling; launches of up to 24 parameters each
    launches = -(-layers // 24)
    dram = fused_bytes / H100["hbm_bytes_per_s"]
    device_s = dram + launches * _a("kernel_launch_s")
    host_s = _a("op_call_host_s") + layers * _a("foreach_entry_host_s")
    per_layer_host = layers * _a("op_call_host_s")
    eager_host = eager_bytes / H100["hbm_bytes_per_s"] + layers * eager_ops * _a("eager_op_s")
    out.append({"target": f"singd_diagonal_step_foreach fp32, ResNet-18 ({params} parameters, "
                          f"{layers} layers, one call)", "kernel": "fused step of all layers "
                          "(cuda)", "dram_bytes": fused_bytes, "launches": launches,
                "host_s": host_s, "per_layer_calls_host_s": per_layer_host,
                "predicted_s": max(device_s, host_s),
                "limited_by": "host (one call)" if host_s > device_s else "DRAM + launches",
                "eager": f"{eager_ops} elementwise ops per layer", "eager_dram_bytes": eager_bytes,
                "eager_s": eager_host, "ratio_vs_eager": eager_host / max(device_s, host_s),
                "per_layer_calls_ratio_vs_eager": eager_host / max(dram + layers
                                                                   * _a("kernel_launch_s"),
                                                                   per_layer_host)})
    # block-diagonal, blocks of 32: per tile (C_i C_i^T) M (K_j K_j^T): 2 * 32 flops per entry
    # and product, on the FMA pipe; eager: block products by bmm plus the elementwise chain
    b = 32
    flops = 2 * params * 2 * b
    fused_t = max(fused_bytes / H100["hbm_bytes_per_s"], flops / H100["fp32_ffma_flops"])
    fused = fused_t + layers * _a("kernel_launch_s")
    eager_ops_b = 10
    eager_bytes_b = eager_ops_b * 3 * 4 * params
    eager = (eager_bytes_b / H100["hbm_bytes_per_s"] + layers * eager_ops_b * _a("eager_op_s"))
    out.append({"target": f"singd_block_step fp32, blocks of {b}, ResNet-18",
                "kernel": "fused step (cuda / triton)", "flops": flops,
                "dram_bytes": fused_bytes, "launches": layers, "predicted_s": fused,
                "limited_by": "DRAM + launches" if fused_t == fused_bytes /
                H100["hbm_bytes_per_s"] else "FMA + launches",
                "eager": f"{eager_ops_b} ops per layer (block products, elementwise chain)",
                "eager_dram_bytes": eager_bytes_b, "eager_s": eager,
                "ratio_vs_eager": eager / fused})
    return out


def main() -> int:
    cuda = cuda_kernels()
    mix = {r["kernel"]: r["sass"] for r in cuda}
    try:
        triton_rows = triton_kernels_ptx()
    except ImportError:
        triton_rows = []
    from block_eigh_banks import bank_table

    banks = bank_table()
    roofline = (patch_covariance_expand(mix, triton_rows)
                + patch_covariance_blocks(triton_rows) + patch_covariance_reduce(triton_rows, cuda)
                + block_eigh_rows(cuda, banks)
                + singd_steps())

    data = json.loads(RESULT.read_text()) if RESULT.exists() else {"arch": "sm_90"}
    data["model"] = {"device": H100, "assumptions": {k: {"value": v, "what": w}
                                                     for k, (v, w) in ASSUMPTIONS.items()},
                     "method": __doc__.split("\n\n")[-1].strip(),
                     "machine": "compiled on a shared 2-core machine without a GPU; nothing here "
                                "is measured"}
    data["cuda_kernels"] = cuda
    data["triton_kernels_ptx"] = triton_rows
    data["roofline"] = [{k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                         for k, v in row.items()} for row in roofline]
    data["block_eigh_bank_conflicts"] = banks
    RESULT.write_text(json.dumps(data, indent=1) + "\n")
    for row in data["roofline"]:
        print(f"{row['target']}\n    {row['kernel']}: predicted {row['predicted_s'] * 1e3:.3f} ms"
              f" ({row['limited_by']}), {row['eager']} {row['eager_s'] * 1e3:.3f} ms: "
              f"x{row['ratio_vs_eager']:.2f}"
              + (f"; x{row['speedup_over_before']:.2f} over the kernel before"
                 if "speedup_over_before" in row else ""))
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel has no ptxas report
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
