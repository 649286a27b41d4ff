"""Shared-memory bank conflicts of the block_eigh CUDA kernel, counted from its index formulas.

Every shared-memory access of one Jacobi round of ``csrc/cuda/block_eigh.cu`` (and of the kernel
before its rows were padded, for comparison) is written here as the element index each lane of a
warp touches, for every warp and every round of a sweep. A warp access is served in phases (the
whole warp for 4-byte elements, each half-warp for 8-byte ones); a phase costs as many wavefronts
as the largest number of distinct 4-byte words it touches in one of the 32 banks. The "ways" of
an access are its wavefronts over its phases: 1 means conflict-free, 32 means all lanes
serialised in one bank.

``python bench/block_eigh_banks.py`` prints the table for n = 64, 96, 128 in fp32 and fp64 and
``--json PATH`` writes it; ``tests/test_block_eigh_banks.py`` requires the padded layout to be
1-way for every per-round access and checks that the counter sees the old 32-way accesses.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

THREADS = 256  # kThreads of the kernel
WARP = 32


def pair_members(k: np.ndarray, r: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The round-robin pair k of round r: (min, max) of (r + k, r - k) mod m; pair 0 is (r, m)."""
    a = np.where(k == 0, r, (r + k) % m)
    b = np.where(k == 0, m, (r - k + m) % m)
    return np.minimum(a, b), np.maximum(a, b)


def pair_info(x: np.ndarray, r: int, m: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """(partner, slot) of index x in round r, as pair_info in the kernel."""
    d = (x - r + m) % m
    k = np.where(d <= half - 1, d, m - d)
    y = (2 * r - x + 2 * m) % m
    slot = np.where(x < y, k, half + k)
    partner = np.where(x == m, r, np.where(x == r, m, y))
    slot = np.where(x == m, half, np.where(x == r, 0, slot))
    return partner, slot


def warp_ways(index: np.ndarray, active: np.ndarray, elem_bytes: int) -> np.ndarray:
    """Ways of each warp access: index, active are (warps, 32) element indices and lane masks.

    4-byte accesses are served for the whole warp, 8-byte ones per half-warp (16 lanes, 128
    bytes: one wavefront when conflict-free). A phase costs the most distinct words in one bank;
    the ways are the wavefronts over the number of phases with an active lane.
    """
    words_per = elem_bytes // 4
    lanes_per_phase = WARP // words_per
    phases = index.shape[1] // lanes_per_phase
    idx = index.reshape(-1, lanes_per_phase)
    act = active.reshape(-1, lanes_per_phase)
    words = idx[:, :, None] * words_per + np.arange(words_per)[None, None, :]
    words = np.where(act[:, :, None], words, -1).reshape(idx.shape[0], -1)
    words = np.sort(words, axis=1)
    dup = np.zeros_like(words, dtype=bool)
    dup[:, 1:] = words[:, 1:] == words[:, :-1]
    valid = (words >= 0) & ~dup
    banks = np.where(valid, words % 32, 32)
    counts = np.zeros((words.shape[0], 33), dtype=np.int64)
    np.add.at(counts, (np.arange(words.shape[0])[:, None], banks), 1)
    wavefronts = counts[:, :32].max(axis=1).reshape(-1, phases).sum(axis=1)
    used = valid.any(axis=1).reshape(-1, phases).sum(axis=1)
    return np.where(used > 0, wavefronts / np.maximum(used, 1), np.nan)


def _thread_loop(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(warps, 32) loop indices e of `for (e = tid; e < count; e += kThreads)` and lane masks."""
    n_iter = math.ceil(count / THREADS)
    e = np.arange(n_iter * THREADS).reshape(-1, WARP)
    return e, e < count


class Tally:
    """Per access pattern: the largest and the access-weighted mean ways over all warps."""

    def __init__(self) -> None:
        self.max: dict[str, float] = {}
        self.sum: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, index, active, elem_bytes: int) -> None:
        ways = warp_ways(np.asarray(index), np.asarray(active), elem_bytes)
        ways = ways[~np.isnan(ways)]
        if ways.size == 0:
            return
        self.max[name] = max(self.max.get(name, 1.0), float(ways.max()))
        self.sum[name] = self.sum.get(name, 0.0) + float(ways.sum())
        self.count[name] = self.count.get(name, 0) + int(ways.size)

    def table(self) -> dict[str, dict[str, float]]:
        return {
            name: {"max_ways": self.max[name],
                   "mean_ways": round(self.sum[name] / self.count[name], 3),
                   "warp_accesses_per_sweep": self.count[name]}
            for name in sorted(self.max)
        }


def padded_round_accesses(np_: int, elem: int, tally: Tally) -> None:
    """One sweep of the kernel with the row stride ld = np + 1 (csrc/cuda/block_eigh.cu)."""
    ld, m, half = np_ + 1, np_ - 1, np_ // 2
    for r in range(m):
        r_next = r + 1 if r + 1 < m else 0
        # step 1: lanes over the pair k, per-slot arrays; the pair tables: lanes over x
        k, act = _thread_loop(half)
        k = np.where(act, k, 0)
        for name, idx, size in (("1 dd[k]", k, elem), ("1 dd[half+k]", half + k, elem),
                                ("1 pq[k]", k, elem), ("1 cs[k], sn[k]", k, 8),
                                ("1 dnew[k]", k, elem), ("1 dnew[half+k]", half + k, elem)):
            tally.add(name, idx, act, size)
        x, act = _thread_loop(np_)
        tally.add("1 info[x], info_next[x]", np.where(act, x, 0), act, 4)
        # step 2: k = e / np, i = e % np; lanes over i
        e, act = _thread_loop(np_ * half)
        k, i = e // np_, e % np_
        p, q = pair_members(np.where(act, k, 0), r, m)
        tally.add("2 A[i][p], A[i][q]", i * ld + p, act, elem)
        tally.add("2 A[i][p], A[i][q]", i * ld + q, act, elem)
        tally.add("2 cs[k], sn[k]", k, act, 8)
        # step 3: k = e / np, j = e % np; lanes over j
        j = i
        tally.add("3 A[p][j], A[q][j]", p * ld + j, act, elem)
        tally.add("3 A[p][j], A[q][j]", q * ld + j, act, elem)
        tally.add("3 Vt[p][j], Vt[q][j]", p * ld + j, act, 8)
        tally.add("3 Vt[p][j], Vt[q][j]", q * ld + j, act, 8)
        # step 4: i = e / np, j = e % np, i >= j; lanes over j
        e, act = _thread_loop(np_ * np_)
        i, j = e // np_, e % np_
        low = act & (i >= j)
        tally.add("4 info[j], info_next[j]", j, low, 4)
        partner, slot = pair_info(np.where(act, j, 0), r, m, half)
        partner_n, slot_n = pair_info(np.where(act, j, 0), r_next, m, half)
        off = low & (i > j) & (partner != i)
        tally.add("4 A[i][j]", i * ld + j, low, elem)
        tally.add("4 A[j][i] (transposed)", j * ld + i, off, elem)
        tally.add("4 A[j][i] (transposed)", j * ld + i, low & (i > j), elem)  # the write
        diag = low & (i == j)
        tally.add("4 dnew[slot], diag[i], dd[slot]", slot, diag, elem)
        tally.add("4 dnew[slot], diag[i], dd[slot]", i, diag, elem)
        tally.add("4 dnew[slot], diag[i], dd[slot]", slot_n, diag, elem)
        tally.add("4 pq[slot]", slot_n, low & (i > j) & (partner_n == i), elem)
    # per sweep: the off-diagonal norm, lanes over e
    e, act = _thread_loop(np_ * np_)
    tally.add("sweep A[i][j] (norm)", (e // np_) * ld + e % np_, act, elem)


def unpadded_round_accesses(np_: int, elem: int, tally: Tally) -> None:
    """One sweep of the kernel before: stride np, lanes over the pair index in steps 2 and 3."""
    m, half = np_ - 1, np_ // 2
    for r in range(m):
        k, act = _thread_loop(half)
        k = np.where(act, k, 0)
        p, q = pair_members(k, r, m)
        tally.add("1 A[p][p], A[q][q]", p * np_ + p, act, elem)
        tally.add("1 A[p][p], A[q][q]", q * np_ + q, act, elem)
        tally.add("1 A[p][q]", p * np_ + q, act, elem)
        tally.add("1 dnew[2k], dnew[2k+1]", 2 * k, act, elem)
        e, act = _thread_loop(np_ * half)
        ii, kk = e // half, e % half
        p, q = pair_members(np.where(act, kk, 0), r, m)
        tally.add("2 A[i][p], A[i][q]", ii * np_ + p, act, elem)
        tally.add("2 A[i][p], A[i][q]", ii * np_ + q, act, elem)
        tally.add("3 A[p][j], A[q][j]", p * np_ + ii, act, elem)
        tally.add("3 A[p][j], A[q][j]", q * np_ + ii, act, elem)
        e, act = _thread_loop(np_ * np_)
        i, j = e // np_, e % np_
        tally.add("4 A[i][j]", i * np_ + j, act & (i > j), elem)
        tally.add("4 A[j][i] (transposed)", j * np_ + i, act & (i > j), elem)
        k, act = _thread_loop(half)
        k = np.where(act, k, 0)
        p, q = pair_members(k, r, m)
        tally.add("5 A[p][q], A[q][p]", p * np_ + q, act, elem)
        tally.add("5 A[p][q], A[q][p]", q * np_ + p, act, elem)


def bank_table(sizes=(64, 96, 128)) -> dict:
    out: dict = {"model": "32 banks of 4 bytes; a warp access is served per warp (4-byte elements) "
                          "or per half-warp (8-byte), a phase costing the most distinct words in "
                          "one bank; ways = wavefronts / phases",
                 "before": {}, "after": {}}
    for dtype, elem in (("float32", 4), ("float64", 8)):
        for n in sizes:
            np_ = n + (n & 1)
            for key, fn in (("before", unpadded_round_accesses), ("after", padded_round_accesses)):
                tally = Tally()
                fn(np_, elem, tally)
                out[key].setdefault(dtype, {})[str(n)] = tally.table()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the table to this file")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 96, 128])
    args = parser.parse_args()
    table = bank_table(tuple(args.sizes))
    for key in ("before", "after"):
        for dtype, per_n in table[key].items():
            for n, rows in per_n.items():
                worst = max(r["max_ways"] for r in rows.values())
                print(f"{key:6s} {dtype} n={n}: worst {worst:g}-way")
                for name, row in rows.items():
                    print(f"    {name:34s} max {row['max_ways']:5g}  mean {row['mean_ways']:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
