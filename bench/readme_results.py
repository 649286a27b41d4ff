"""Build the README's results section from the files in bench/results/ (no hand-typed numbers).

    python bench/readme_results.py            # rewrite the section in README.md
    python bench/readme_results.py --check    # exit 1 if README.md is out of date

The section lies between ``<!-- results:start -->`` and ``<!-- results:end -->``. Every table
names the device, the thread count and the date of the run it comes from; a file that does not
exist is left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _env(d: dict) -> str:
    env = d.get("environment", {})
    device = env.get("device_name") or env.get("cpu") or env.get("device", "?")
    date = str(env.get("date", "?"))[:10]
    return f"{device}, torch {env.get('torch', '?')}, {date}"


def patch_covariance() -> list[str]:
    d = _load("patch_covariance_cpu.json")
    if d is None:
        return []
    rows: dict[str, dict] = {}
    for r in d["results"]:
        if r.get("threads") != 1 or r.get("backend") != "cpu":
            continue
        row = rows.setdefault(r["name"], {})
        row[r["mode"]] = r["speedup_vs_eager"]
        if "temporaries_bytes" in r:
            row["tmp"] = max(row.get("tmp", 0.0), r["temporaries_bytes"] / r["unfold_bytes"])
    out = [f"**`patch_covariance`, cpu backend vs eager (unfold), 1 thread** ({_env(d)}; "
           "`bench/results/patch_covariance_cpu.json`). Temporaries: the largest peak memory "
           "growth minus the output over the three modes, as a fraction of the unfolded tensor.",
           "", "| layer | reduce | expand | blocked (4) | temporaries / unfold |",
           "| --- | ---: | ---: | ---: | ---: |"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"
    for name, row in rows.items():
        tmp = f"{row['tmp']:.3f}" if "tmp" in row else "-"
        out.append(f"| {name} | {fmt(row.get('reduce'))} | {fmt(row.get('expand'))} | "
                   f"{fmt(row.get('blocked'))} | {tmp} |")
    return out + [""]


def patch_covariance_crossover() -> list[str]:
    """The cpu backend's algorithms per shape: a grid per (kernel, stride, mode) of the chosen
    algorithm's speed-up over the im2col-free kernel."""
    d = _load("patch_covariance_crossover_cpu.json")
    if d is None:
        return []
    short = {"implicit": "i", "chunked": "c", "shifted": "s"}
    out = [f"**`patch_covariance`, cpu backend: which algorithm `auto` runs** ({_env(d)}; 1 "
           "thread, CPU time, median of the rounds; batch 32, padding k // 2; "
           "`bench/results/patch_covariance_crossover_cpu.json`). Each cell: the speed-up of "
           "the fastest algorithm over the im2col-free kernel, the fastest (i: im2col-free, c: "
           "chunked unfolding + BLAS, s: shifted correlations) and, if it differs, `auto`'s "
           "pick in brackets.", ""]
    groups: dict[tuple, dict] = {}
    for r in d["results"]:
        key = (r["kernel"], r.get("stride", 1), r["mode"])
        groups.setdefault(key, {})[(r["c"], r["hw"])] = r
    for (k, stride, mode), cells in groups.items():
        if mode == "reduce" or k == 1:
            continue  # the kernel wins every reduce and 1x1 case (see the JSON)
        hws = sorted({hw for _, hw in cells})
        out += [f"{k}x{k} {mode}, stride {stride}:", "",
                "| C | " + " | ".join(f"{hw}x{hw}" for hw in hws) + " |",
                "| ---: |" + " ---: |" * len(hws)]
        for c in sorted({c for c, _ in cells}):
            row = []
            for hw in hws:
                r = cells.get((c, hw))
                if r is None:
                    row.append("-")
                    continue
                best = r["fastest"]
                speed = r["implicit_median_s"] / r[f"{best}_median_s"]
                pick = "" if r["rule_chooses"] == best else f" ({short[r['rule_chooses']]})"
                row.append(f"{speed:.2f}x {short[best]}{pick}")
            out.append(f"| {c} | " + " | ".join(row) + " |")
        out.append("")
    misses = d.get("rule_misses_over_5_percent", [])
    reduce_and_1x1 = [r for r in d["results"] if r["mode"] == "reduce" or r["kernel"] == 1]
    kernel_wins = sum(r["fastest"] == "implicit" for r in reduce_and_1x1)
    out += [f"Reduce and 1x1 factors: the im2col-free kernel is the fastest at {kernel_wins} of "
            f"{len(reduce_and_1x1)} shapes. `auto`'s pick is more than 5 % slower than the "
            f"fastest at {len(misses)} of {len(d['results'])} shapes"
            + (f": {', '.join(misses)}." if misses else "."), ""]
    return out


def block_eigh() -> list[str]:
    d = _load("block_eigh_cpu.json")
    if d is None:
        return []
    out = [f"**`block_eigh`: the C++ batched Jacobi kernel itself, 1 thread** (the cpu backend "
           "uses it up to n = 8 and hands larger blocks to LAPACK, where Jacobi loses) "
           f"({_env(d)}; `bench/results/block_eigh_cpu.json`)", "",
           "| case | vs batched `torch.linalg.eigh` | vs per-block loop |", "| --- | ---: | ---: |"]
    for r in d["results"]:
        if "speedup_vs_batched" not in r:
            continue
        loop = r.get("speedup_vs_loop")
        out.append(f"| {r['case']} | {r['speedup_vs_batched']:.2f}x | "
                   f"{'-' if loop is None else f'{loop:.2f}x'} |")
    return out + [""]


def bdkfac() -> list[str]:
    d = _load("bdkfac_cpu.json")
    if d is None:
        return []
    out = [f"**BD-KFAC (4 blocks) vs K-FAC: one whole inverse update and the optimizer state** "
           f"({_env(d)}; `bench/results/bdkfac_cpu.json`)", "",
           "| model | threads | K-FAC | BD-KFAC | speed-up | K-FAC state | BD-KFAC state |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in d["results"]:
        out.append(f"| {r['model']} | {r['threads']} | {r['kfac_inverse_update_s']:.2f} s | "
                   f"{r['bdkfac_inverse_update_s']:.2f} s | {r['speedup']:.1f}x | "
                   f"{r['kfac_state_bytes'] / 2**20:.0f} MiB | "
                   f"{r['bdkfac_state_bytes'] / 2**20:.0f} MiB |")
    return out + [""]


def singd(filename: str = "singd_cpu.json") -> list[str]:
    d = _load(filename)
    if d is None:
        return []
    out = []
    for model in d["models"].values():
        out += [f"**SINGD step time and optimizer state vs `torch.optim.AdamW`** "
                f"({model['description']}; {_env(d)}; `bench/results/{filename}`). Whole "
                "training step (forward, backward, optimizer) and the optimizer step alone.", "",
                "| optimizer | T | fused | step time / AdamW | optimizer step / AdamW | "
                "state / AdamW |",
                "| --- | ---: | --- | ---: | ---: | ---: |"]
        for r in model["results"]:
            if "step_time_vs_adamw" not in r:
                continue
            out.append(f"| {r['optimizer']} | {r.get('T', '-')} | "
                       f"{'yes' if r.get('fused') else 'no'} | {r['step_time_vs_adamw']:.2f} | "
                       f"{r['optimizer_step_vs_adamw']:.2f} | "
                       f"{r['state_memory_vs_adamw']:.2f} |")
        out.append("")
    return out


def peers() -> list[str]:
    d = _load("peers_cpu.json")
    if d is None:
        return []
    env = d["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("peers", {}).items() if v)
    shared = " (shared machine)" if env.get("shared_machine") else ""
    head = (f"({_env(d)}; {env.get('cpu_threads', '?')} thread, CPU time, median of "
            f"{env.get('rounds', '?')} interleaved rounds{shared}; {versions}; "
            "`bench/results/peers_cpu.json`)")
    out = []
    if d.get("factors"):
        libs = list(dict.fromkeys(r["library"] for r in d["factors"]))
        out += [f"**Convolution factor `A` against the peers: time / ours, peak extra memory "
                f"in MiB** (3x3 convolutions of ResNet-18's stages, batch 32; each factor "
                f"checked equal to ours up to its library's scaling first) {head}", "",
                "| input | form | " + " | ".join(libs) + " |",
                "| --- | --- | " + " | ".join("---:" for _ in libs) + " |"]
        cells: dict[tuple, dict] = {}
        for r in d["factors"]:
            cells.setdefault((r["c"], r["hw"], r["mode"]), {})[r["library"]] = r
        for (c, hw, mode), row in cells.items():
            items = []
            for lib in libs:
                r = row.get(lib)
                if r is None:
                    items.append("-")
                    continue
                mem = (f", {r['peak_extra_bytes'] / 2**20:.1f}" if "peak_extra_bytes" in r
                       else "")
                items.append(f"{r['time_vs_ours']:.2f}{mem}" if lib != "ours"
                             else f"{r['median_s'] * 1e3:.1f} ms{mem}")
            out.append(f"| {c} x {hw}x{hw} | {mode} | " + " | ".join(items) + " |")
        out.append("")
    for section, title, cadence in (
            ("steps", "K-FAC", "factors updated every step, inverses every `T` steps"),
            ("singd", "SINGD", "`K` and `C` updated every `T` steps")):
        rows = d.get(section)
        if not rows:
            continue
        out += [f"**{title} training step against the peers, as a multiple of AdamW's step on "
                f"the same model** (forward, backward, optimizer; {cadence}, amortised) {head}",
                "",
                "| model | T | " + " | ".join(dict.fromkeys(r["contender"] for r in rows)) + " |",
                "| --- | ---: | " + " | ".join("---:" for _ in dict.fromkeys(
                    r["contender"] for r in rows)) + " |"]
        names = list(dict.fromkeys(r["contender"] for r in rows))
        by = {}
        for r in rows:
            by.setdefault((r["model"], r["T"]), {})[r["contender"]] = (
                "failed" if "error" in r else f"{r['step_vs_adamw']:.2f}")
        for (model, T), vals in by.items():
            out.append(f"| {model} | {T} | " + " | ".join(vals.get(n, "-") for n in names)
                       + " |")
        failed = [r for r in rows if "error" in r]
        if failed:
            out.append("")
            out += [f"Failed: {r['contender']} on {r['model']}, T={r['T']}: `{r['error']}`"
                    for r in failed]
        out.append("")
    return out


def evidence(key: str) -> list[str]:
    d = _load(f"evidence_{key}.json")
    if d is None:
        return []
    rows = d["summary"]
    ref = next((r for r in rows if r["optimizer"] == "adamw"), None)
    first = next(iter(d["runs"].values()))[0]
    # runs with a learning-rate grid record CPU time (the process's own), older ones wall time
    cpu = "median_cpu_to_target_s" in rows[0]
    time_key = "median_cpu_to_target_s" if cpu else "median_time_to_target_s"
    what = "CPU time" if cpu else "time"
    grid = ("; each optimizer at the best of its learning rates x "
            f"{{{', '.join(f'{m:.3g}' for m in d['lr_grid'])}}}" if d.get("lr_grid") else "")
    out = [f"**`kfac-train --task {first['task']} --compare ...`, {first['dtype']}, "
           f"{first['steps']} steps, seeds {rows[0]['seeds']}, target {rows[0]['target']}** "
           f"(medians over seeds{grid}; {d.get('device_name', first['device'])}, "
           f"{d.get('date', '')[:10]}; `bench/results/evidence_{key}.json`)", "",
           f"| optimizer | lr | reached | steps to target | steps vs AdamW | {what} to target | "
           f"{what} vs AdamW | final test loss | final test acc |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        steps, secs = r["median_steps_to_target"], r[time_key]
        rs = (f"{steps / ref['median_steps_to_target']:.2f}" if ref and steps is not None
              and ref["median_steps_to_target"] else "-")
        rt = (f"{secs / ref[time_key]:.2f}" if ref and secs is not None and ref[time_key]
              else "-")
        out.append(f"| {r['optimizer']} | {r['lr']:.3g} | {r['reached']}/{len(r['seeds'])} | "
                   f"{'-' if steps is None else f'{steps:g}'} | {rs} | "
                   f"{'-' if secs is None else f'{secs:.2f} s'} | {rt} | "
                   f"{r['median_test_loss']:.4f} | {r['median_test_accuracy']:.4f} |")
    return out + [""]


# The Kronecker-factored methods: K-FAC, BD-KFAC, their adaptive forms, and the SINGD family
# (INGD, IKFAC: inverse-free Kronecker-factored natural gradient).
KFAC_FAMILY = ("kfac", "bdkfac", "kfac-adaptive", "bdkfac-adaptive", "ingd", "ikfac",
               "singd-dense", "singd-diagonal", "singd-block-diagonal", "singd-hierarchical",
               "singd-lower-triangular", "singd-rank-k-lower-triangular",
               "singd-upper-triangular-toeplitz")
EVIDENCE_TASKS = ("digits", "digits-bn", "digits-autoencoder", "digits-vit", "deep-linear",
                  "graphs", "char-lm")


def _ratio(value, ref):
    return None if value is None or not ref else value / ref


def _fmt(value, spec=".2f", unit=""):
    return "-" if value is None else f"{value:{spec}}{unit}"


def _lr(r) -> str:
    return "adaptive" if r["lr"] is None else f"{r['lr']:.3g}"


def evidence_grid() -> list[str]:
    """The tuned comparisons (``kfac-train --compare ... --lr-grid``): per task the best
    learning rate of each optimizer, steps and CPU time to the target against AdamW's, and a
    summary of the acceptance criteria across tasks."""
    found = [(t, _load(f"evidence_{t}.json")) for t in EVIDENCE_TASKS]
    found = [(t, d) for t, d in found if d is not None and d.get("lr_grid")]
    if not found:
        return []
    out = []
    summary = ["**Summary over the tasks** (medians of the seeds; each optimizer with the best "
               "of its three learning rates, the adaptive ones with none; ratios to AdamW's)",
               "", "| task | AdamW steps / CPU s | best K-FAC family (steps, CPU) | Muon "
               "(steps, CPU) | SOAP (steps, CPU) | adaptive K-FAC steps | SINGD steps vs SGD "
               "steps |",
               "| --- | ---: | --- | --- | --- | ---: | --- |"]
    for task, d in found:
        rows = {r["optimizer"]: r for r in d["summary"]}
        ref = rows.get("adamw")
        first = next(iter(d["runs"].values()))[0]
        command = " and ".join(d.get("commands", [d["command"]]))
        out += [f"**`{task}`: {command}** ({first['steps']} steps at most, seeds "
                f"{ref['seeds'] if ref else '?'}, target {first['target']['metric']}="
                f"{first['target']['value']:g}; {d.get('device_name', first['device'])}, "
                f"{d.get('date', '')[:10]}, one thread, CPU time of the process, shared "
                f"machine; `bench/results/evidence_{task}.json`)", "",
                "| optimizer | lr | reached | steps to target | steps vs AdamW | CPU time to "
                "target | CPU time vs AdamW | CPU ms / step |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in d["summary"]:
            steps, cpu = r["median_steps_to_target"], r["median_cpu_to_target_s"]
            out.append(
                f"| {r['optimizer']} | {_lr(r)} | "
                f"{r['reached']}/{len(r['seeds'])} | {_fmt(steps, 'g')} | "
                f"{_fmt(_ratio(steps, ref and ref['median_steps_to_target']))} | "
                f"{_fmt(cpu, '.2f', ' s')} | "
                f"{_fmt(_ratio(cpu, ref and ref['median_cpu_to_target_s']))} | "
                f"{_fmt(1e3 * r['median_cpu_s_per_step'], '.1f')} |")
        out.append("")
        if ref is None:
            continue
        fam = [r for o, r in rows.items() if o in KFAC_FAMILY
               and r["median_steps_to_target"] is not None]
        best = min(fam, key=lambda r: (r["median_cpu_to_target_s"], r["median_steps_to_target"]),
                   default=None)
        rs = lambda r: _ratio(r["median_steps_to_target"], ref["median_steps_to_target"])  # noqa
        rc = lambda r: _ratio(r["median_cpu_to_target_s"], ref["median_cpu_to_target_s"])  # noqa
        muon, soap = rows.get("muon"), rows.get("soap")
        ada = rows.get("kfac-adaptive")
        singd = min((r for o, r in rows.items() if o.startswith("singd")
                     or o in ("ingd", "ikfac")),
                    key=lambda r: r["median_steps_to_target"] or float("inf"), default=None)
        sgd = rows.get("sgd")
        summary.append(
            f"| {task} | {_fmt(ref['median_steps_to_target'], 'g')} / "
            f"{_fmt(ref['median_cpu_to_target_s'])} | "
            + (f"{best['optimizer']}: {_fmt(rs(best))}, {_fmt(rc(best))}" if best else "none")
            + " | " + (f"{_fmt(rs(muon))}, {_fmt(rc(muon))}" if muon else "-")
            + " | " + (f"{_fmt(rs(soap))}, {_fmt(rc(soap))}" if soap else "-")
            + " | " + (_fmt(rs(ada)) if ada else "-") + " | "
            + (f"{singd['optimizer']} {_fmt(singd['median_steps_to_target'], 'g')} vs "
               f"{_fmt(sgd['median_steps_to_target'], 'g')}" if singd and sgd else "-") + " |")
    return summary + [""] + out


HORIZON_TASKS = ("digits-vit", "char-lm")


def horizon() -> list[str]:
    """SINGD against SGD with a longer budget on the tasks where neither or only SGD reached
    the target in the tuned comparisons' 300 steps (``horizon_<task>.json``)."""
    out = []
    for task in HORIZON_TASKS:
        d = _load(f"horizon_{task}.json")
        if d is None:
            continue
        first = next(iter(d["runs"].values()))[0]
        out += [f"**`{task}`, a longer budget: {d['command']}** ({first['steps']} steps at most, "
                f"target {first['target']['metric']}={first['target']['value']:g}; "
                f"{d.get('device_name', first['device'])}, {d.get('date', '')[:10]}; "
                f"`bench/results/horizon_{task}.json`)", "",
                "| optimizer | lr | reached | steps to target (median) | per seed |",
                "| --- | ---: | ---: | ---: | --- |"]
        for r in d["grid"]:
            per_seed = r["steps_to_target"]
            out.append(f"| {r['optimizer']} | {_lr(r)} | {r['reached']}/{len(r['seeds'])} | "
                       f"{_fmt(r['median_steps_to_target'], 'g')} | "
                       + ", ".join("-" if s is None else str(s) for s in per_seed) + " |")
        out.append("")
    return out


def amortisation() -> list[str]:
    d = _load("amortisation_cpu.json")
    if d is None:
        return []
    tasks = list(dict.fromkeys(r["task"] for r in d["results"]))
    configs = list(dict.fromkeys(r["config"] for r in d["results"]))
    cell = {(r["task"], r["config"]): r["vs_adamw"] for r in d["results"]}
    out = [f"**Step time against AdamW per factor / inverse period (`F/I`) and SINGD's `T`** "
           f"(whole training step, CPU time, one thread, median of {d['rounds']} interleaved "
           f"rounds of {d['steps_per_round']} steps; {_env(d)}, shared machine; "
           "`bench/results/amortisation_cpu.json`)", "",
           "| configuration | " + " | ".join(tasks) + " |",
           "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for c in configs:
        out.append(f"| {c} | " + " | ".join(_fmt(cell.get((t, c))) for t in tasks) + " |")
    return out + [""]


def two_level() -> list[str]:
    d = _load("two_level_deep_linear.json")
    if d is None:
        return []
    st = d["settings"]
    epochs = st["epochs"]
    out = [f"**Two-level vs one-level K-FAC, deep linear MLP of Tselepidis et al. (2020) "
           f"({st['depth']} hidden layers of width {st['width']}, {st['n_train']} samples, {epochs} epochs of batch "
           f"{st['batch']}; training loss on the whole training set)** ({_env(d)}; "
           f"`bench/results/two_level_deep_linear.json`)", "",
           "| setting | seeds | two-level ahead at the end | two-level collapsed (loss ~ log 2) "
           "| median final loss, one-level | median final loss, two-level |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for cfg in d["configs"]:
        rows = [r for r in d["results"] if r["config"] == cfg["name"]]
        ahead = sum(r["two_level_ahead_at_end"] for r in rows)
        flags = [r["two_level_collapsed"] for r in rows]
        collapsed = "-" if None in flags else f"{sum(flags)} of {len(rows)}"
        out.append(f"| {cfg['name']} | {len(rows)} | {ahead} of {len(rows)} | {collapsed} | "
                   f"{statistics.median(r['one_level'][-1] for r in rows):.4f} | "
                   f"{statistics.median(r['two_level'][-1] for r in rows):.4f} |")
    first = d["configs"][0]["name"]
    out += ["", f"Per seed, {first} (training loss after epochs 1, 5 and {epochs}, one-level / "
            "two-level):", "",
            f"| seed | epoch 1 | epoch 5 | epoch {epochs} |", "| ---: | ---: | ---: | ---: |"]
    for r in d["results"]:
        if r["config"] == first:
            cells = [f"{r['one_level'][e]:.4f} / {r['two_level'][e]:.4f}"
                     for e in (0, 4, epochs - 1)]
            out.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return out + [""]


def gpu_targets() -> list[str]:
    d = _load("nvidia-h200_targets.json")
    if d is None:
        return []
    env = d["environment"]
    pc = {(r["mode"], r["dtype"], r["allow_tf32"], r["num_blocks"]): r
          for r in d["patch_covariance"]}
    eig = {(r["n"], r["B"]): r for r in d["block_eigh"]}
    steps = {r["target"].split()[0]: r for r in d["singd_steps"]}
    train = {r["optimizer"]: r for r in d["training_steps"]}

    def best(row, ref_key):
        """The text of the GPU backends' speed-ups over ``row[ref_key]``, and the best one."""
        speed = {be: row[ref_key] / row[be]["s"] for be in ("cuda", "triton")
                 if "s" in row.get(be, {})}
        be = max(speed, key=speed.get)
        return (f"{speed[be]:.2f}x ({be}; {', '.join(f'{k} {v:.2f}x' for k, v in speed.items())})",
                speed[be])

    out = [f"**GPU targets on an {env.get('gpu')}** (torch {env.get('torch')}, Triton "
           f"{env.get('triton')}, CUDA {env.get('cuda')}; medians of CUDA-event timings; "
           "`bench/gpu_targets.py`, `bench/results/nvidia-h200_targets.json`). Speed-ups are "
           "against unfold + one matrix product in the same dtype (`patch_covariance`), "
           "`torch.linalg.eigh` (`block_eigh`) and the eager step (SINGD).", "",
           "| target | goal | measured | met |", "| --- | ---: | --- | :---: |"]

    def add(name, goal, value, met):
        out.append(f"| {name} | {goal} | {value} | {'yes' if met else 'no'} |")

    r = pc[("expand", "bfloat16", False, None)]
    text, _ = best(r, "unfold_matmul_s")
    add("`patch_covariance` expand bf16, ResNet-50 stage 3", ">= 2x, >= 50% of peak",
        text + f"; {r['cuda']['fraction_of_h100_peak'] * 100:.1f}% of the bf16 peak", False)
    text, top = best(pc[("reduce", "float32", False, None)], "eager_op_s")
    add("`patch_covariance` reduce fp32, same layer", ">= 10x", text, top >= 10)
    text, top = best(pc[("expand", "bfloat16", False, 4)], "eager_op_s")
    add("`patch_covariance` 4 diagonal blocks bf16, same layer", ">= 3x", text, top >= 3)
    for n in (33, 64, 96, 128):
        for b in (64, 1024):
            if (n, b) in eig:
                text, top = best(eig[(n, b)], "eigh_s")
                add(f"`block_eigh` fp32, n = {n}, B = {b}", ">= 30x", text, top >= 30)
    for op, how in (("singd_diagonal_step", ""), ("singd_diagonal_step_foreach", ", one call"),
                    ("singd_block_step", "")):
        if op in steps:
            text, top = best(steps[op], "eager_s")
            add(f"`{op}` fp32, ResNet-18's 21 layers{how}", ">= 5x", text, top >= 5)
    fused = train.get("singd-diagonal T=10 fused")
    if fused is not None and "time_vs_adamw" in fused:
        add("SINGD-diagonal T=10 (fused) training step, ResNet-18 CIFAR batch 128 bf16",
            "<= 1.1x AdamW time and memory",
            f"time {fused['time_vs_adamw']:.2f}x ({fused['step_s'] * 1e3:.1f} vs "
            f"{train['adamw']['step_s'] * 1e3:.1f} ms), peak memory "
            f"{fused['peak_memory_vs_adamw']:.2f}x, state {fused['state_memory_vs_adamw']:.2f}x",
            fused["time_vs_adamw"] <= 1.1 and fused["peak_memory_vs_adamw"] <= 1.1)
    out.append("")
    m = _load("static_vs_h200.json")
    if m is not None:
        out += ["**The static H100 model against the H200** (`bench/static_vs_h200.py`, "
                "`bench/results/static_vs_h200.json`, which says why each miss happened and what "
                "the model needs instead):", "",
                "| target | kernel | predicted / measured time (ms) | speed-up predicted / "
                "measured |", "| --- | --- | ---: | ---: |"]
        for r in m["rows"]:
            out.append(f"| {r['target'].split(':')[0].split(' (')[0]} | {r['kernel']} | "
                       f"{r['predicted_s'] * 1e3:.2f} / {r['measured_s'] * 1e3:.2f} | "
                       f"{r['predicted_ratio']:.2f}x / {r['measured_ratio']:.2f}x |")
        out.append("")
    return out


def section() -> str:
    lines = [START, ""]
    for part in (evidence_grid(), horizon(), amortisation(), evidence("digits_bf16"),
                 patch_covariance(), patch_covariance_crossover(), peers(), bdkfac(),
                 block_eigh(), singd(), singd("singd_cpu_bf16.json"), gpu_targets(), two_level()):
        lines += part
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    if START not in readme or END not in readme:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + section() + tail
    if args.check:
        if new != readme:
            print("README.md's results section is out of date: run "
                  "python bench/readme_results.py", file=sys.stderr)
            return 1
        return 0
    (ROOT / "README.md").write_text(new)
    print("README.md results section rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
