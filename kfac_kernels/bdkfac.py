r"""Block-Diagonal K-FAC (BD-KFAC, seed 000) over any torch.optim optimizer.

Every Kronecker factor is replaced by its diagonal blocks over partitions ``S_1 .. S_n`` of a
layer's inputs and ``T_1 .. T_n`` of its outputs (see :mod:`kfac_kernels.block_layers`), and the
preconditioner stores the damped block inverses of seed 000 Sec. 4.4,

.. math::

    A_i^{-1}(\gamma_A) = Q_{A,i} (\Lambda_{A,i} + \gamma_A I)^{-1} Q_{A,i}^\top, \qquad
    G_j^{-1}(\gamma_G) = Q_{G,j} (\Lambda_{G,j} + \gamma_G I)^{-1} Q_{G,j}^\top,

computed for all blocks of all layers by :func:`kfac_kernels.ops.block_damped_inverse` (one
batched eigensolver call per block size, instead of one decomposition per block). The gradient
matrix ``M = [dW | db]`` of a layer becomes

.. math::

    V = \mathrm{blockdiag}(G_j^{-1}(\gamma_G))\; M \;\mathrm{blockdiag}(A_i^{-1}(\gamma_A)),

applied as batched block matrix products (no dense factor or inverse is ever formed).
``damping_split="equal"`` uses ``gamma_A = gamma_G = damping`` as the paper does;
``"pi"`` uses ``pi sqrt(damping)`` and ``sqrt(damping) / pi`` with
``pi = sqrt((tr A / dim A) / (tr G / dim G))`` per layer (seed 004, Eq. 8-9). Compared with K-FAC's
exact eigen damping ``1 / (lambda_G lambda_A + gamma)``, precomputed inverses scale eigendirection
``(i, j)`` by ``1 / ((lambda_G + gamma)(lambda_A + gamma))`` (seed 000 App. A).

Usage is that of :class:`kfac_kernels.KFAC` (with the paper's defaults: 4 blocks, damping
2.8e-3, KL-clip 2e-3, factors every 12 steps, inverses every 120)::

    optimizer = PreconditionedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                        BDKFAC(model))
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .block_layers import make_block_adapter
from .capture import CurvatureCapture
from .curvature import _skipped
from .kfac import KFAC, _positive_int

DAMPING_SPLITS = ("equal", "pi")


class BlockCurvatureCapture(CurvatureCapture):
    """:class:`CurvatureCapture` whose accumulators are lists of diagonal blocks."""

    def factors(self, name: str):
        acc = self.acc[name]
        if acc.a_sum is None or acc.g_sum is None or acc.a_rows == 0:
            return None
        return [a / acc.a_rows for a in acc.a_sum], list(acc.g_sum)


def _blockdiag_left(blocks: list[torch.Tensor], mat: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks) @ mat`` for ``mat`` ``(groups, rows, cols)`` and blocks
    ``(groups, b, b)``: the equal-size leading blocks as one batched product, then the last."""
    groups, rows, cols = mat.shape
    if len(blocks) == 1:
        return blocks[0] @ mat
    q, n = blocks[0].shape[-1], len(blocks) - 1
    lead = torch.stack(blocks[:-1], dim=1)                     # (groups, n, q, q)
    head = lead @ mat[:, :q * n].reshape(groups, n, q, cols)    # (groups, n, q, cols)
    tail = blocks[-1] @ mat[:, q * n:]
    return torch.cat([head.reshape(groups, q * n, cols), tail], dim=1)


def _blockdiag_right(mat: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """``mat @ blockdiag(blocks)`` (blocks symmetric, so via the left product of ``mat^T``)."""
    return _blockdiag_left(blocks, mat.mT).mT


class BDKFAC(KFAC):
    """Block-diagonal K-FAC preconditioner: ``loss.backward(); precond.step(); optimizer.step()``.

    Args (besides those of :class:`kfac_kernels.KFAC`, whose meaning is unchanged):
        model: the network; ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, and affine
            ``nn.LayerNorm`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` layers are preconditioned.
        num_blocks: blocks per factor (default 4; ``min(num_blocks, features)``; near-equal contiguous parts
            of the input features or channels and of the output features, the last absorbing the
            remainder, the bias coordinate in the last input block).
        block_size: instead of ``num_blocks``: parts of this many features (channels).
        damping: ``gamma`` of the damped block inverses.
        damping_split: ``"equal"`` (``gamma`` on both sides, seed 000) or ``"pi"``.
        kfac_approx: ``"reduce"`` (default: spatially averaged inputs, seed 000 Sec. 4.2; output
            gradients summed over positions as in seed 001 Eq. 10, so ``kron(G, A)`` estimates the
            curvature of the loss -- the paper's average of them is ``1/R^2`` of that) or
            ``"expand"`` (every position an example).
        eigh_backend: backend of :func:`kfac_kernels.ops.block_damped_inverse`.

    Normalisation layers always sum their output gradients over the non-parameter axes
    (seed 000 Sec. 4.3), whatever ``kfac_approx`` says.
    """

    _SUPPORTED_NAMES = ("nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d, "
                        "nn.BatchNorm2d")
    _capture_class = BlockCurvatureCapture

    def __init__(self, model: nn.Module, *, num_blocks: int | None = None,
                 block_size: int | None = None, damping: float = 2.8e-3,
                 damping_split: str = "equal", factor_decay: float = 0.95,
                 factor_update_steps: int = 12, inv_update_steps: int = 120,
                 kfac_approx: str = "reduce", kl_clip: float | None = 2e-3,
                 eigh_backend: str = "auto", **kwargs):
        who = type(self).__name__
        if block_size is not None:
            _positive_int(who, "block_size", block_size)
            if num_blocks is not None:
                raise ValueError(f"{who}: pass num_blocks or block_size, not both (got "
                                 f"num_blocks={num_blocks!r}, block_size={block_size!r})")
        else:
            num_blocks = 4 if num_blocks is None else num_blocks
            _positive_int(who, "num_blocks", num_blocks)
        if damping_split not in DAMPING_SPLITS:
            raise ValueError(f"{who}: damping_split must be 'equal' or 'pi', got "
                             f"{damping_split!r}")
        for key in ("damping_form", "compute_method"):
            if key in kwargs:
                raise TypeError(f"{who}: {key} is not an argument of BDKFAC (it always "
                                "precomputes damped block inverses; see damping_split)")
        from ._backend import BACKENDS
        if eigh_backend not in BACKENDS:
            raise ValueError(f"{who}: eigh_backend must be one of {', '.join(map(repr, BACKENDS))}"
                             f", got {eigh_backend!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.damping_split = damping_split
        self.eigh_backend = eigh_backend
        super().__init__(model, damping=damping, factor_decay=factor_decay,
                         factor_update_steps=factor_update_steps,
                         inv_update_steps=inv_update_steps, kfac_approx=kfac_approx,
                         kl_clip=kl_clip, damping_form="factored", compute_method="inverse",
                         **kwargs)

    def _find_adapters(self, model: nn.Module, skip_modules: tuple, who: str) -> dict:
        import warnings
        adapters, unsupported = {}, []
        for name, module in model.named_modules():
            if _skipped(name, module, skip_modules):
                continue
            adapter = make_block_adapter(name, module, self.num_blocks, self.block_size)
            if adapter is not None:
                if adapter.trainable:
                    adapters[name] = adapter
                continue
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
        if unsupported:
            warnings.warn(
                f"{who}: no Kronecker-factored curvature for modules {', '.join(unsupported)}; "
                "their gradients are used unchanged. Pass skip_modules=[...] with their names or "
                "types to silence this warning.", stacklevel=4)
        return adapters

    # --- preconditioners --------------------------------------------------------------------
    def _dampings(self, a_blocks, g_blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group damping of the A and G side, ``(groups,)`` each."""
        groups = a_blocks[0].shape[0]
        ref = a_blocks[0]
        if self.damping_split == "equal":
            d = torch.full((groups,), self.damping, dtype=ref.dtype, device=ref.device)
            return d, d
        trace = lambda blocks: sum(torch.diagonal(b, dim1=-2, dim2=-1).sum(-1) for b in blocks)
        dim_a = sum(b.shape[-1] for b in a_blocks)
        dim_g = sum(b.shape[-1] for b in g_blocks)
        ta, tg = trace(a_blocks) / dim_a, trace(g_blocks) / dim_g
        ok = (ta > 0) & (tg > 0)
        pi = torch.where(ok, torch.sqrt(ta.clamp_min(1e-300) / tg.clamp_min(1e-300)),
                         torch.ones_like(ta))
        root = math.sqrt(self.damping)
        return pi * root, root / pi

    def _damped_inverses(self, names: list[str], dtype: torch.dtype | None = None
                         ) -> dict[str, dict[str, list[torch.Tensor]]]:
        """Damped inverses of every block of the layers ``names``: one call of
        :func:`ops.block_damped_inverse` per (dtype, device) with all their blocks."""
        from .ops import block_damped_inverse
        by_kind: dict[tuple, list] = {}
        for name in names:
            a_blocks, g_blocks = self.factors[name]
            if dtype is not None:
                a_blocks = [b.to(dtype) for b in a_blocks]
                g_blocks = [b.to(dtype) for b in g_blocks]
            damp_a, damp_g = self._dampings(a_blocks, g_blocks)
            key = (a_blocks[0].dtype, a_blocks[0].device)
            entries = by_kind.setdefault(key, [])
            for side, blocks, damp in (("inv_A", a_blocks, damp_a), ("inv_G", g_blocks, damp_g)):
                for index, block in enumerate(blocks):
                    entries.append((name, side, index, block, damp))
        out: dict[str, dict[str, list]] = {
            name: {"inv_A": [None] * len(self.factors[name][0]),
                   "inv_G": [None] * len(self.factors[name][1])} for name in names}
        for entries in by_kind.values():
            mats = [m for *_, block, _ in entries for m in block.unbind(0)]
            damps = torch.cat([damp for *_, damp in entries])
            inverses = block_damped_inverse(mats, damps, backend=self.eigh_backend)
            at = 0
            for name, side, index, block, _ in entries:
                groups = block.shape[0]
                out[name][side][index] = torch.stack(inverses[at:at + groups])
                at += groups
        return out

    def _factor_template(self, name: str):
        ad = self.adapters[name]
        kw = dict(dtype=self.capture.dtype_of(name), device=ad.weight.device)
        shapes_a, shapes_g = self._block_shapes(name)
        return ([torch.zeros(s, **kw) for s in shapes_a], [torch.zeros(s, **kw) for s in shapes_g])

    def _preconditioner_template(self, name: str) -> dict:
        zeros_a, zeros_g = self._factor_template(name)
        return {"inv_A": zeros_a, "inv_G": zeros_g}

    def _decomposition_cost(self, name: str) -> float:
        shapes_a, shapes_g = self._block_shapes(name)
        return float(sum(s[0] * s[-1] ** 3 for s in (*shapes_a, *shapes_g)))

    def _refresh_local(self, names: list[str]) -> None:
        names = [n for n in names if self._factors_finite(n)]
        if not names:
            return
        result = self._damped_inverses(names)
        retry = [n for n in names if not _finite_dec(result[n])]
        if retry:
            # Blocks that did not converge or overflowed in fp32: once more in fp64.
            again = self._damped_inverses(retry, torch.float64)
            for name in retry:
                dtype = self.factors[name][0][0].dtype
                result[name] = {k: [b.to(dtype) for b in v] for k, v in again[name].items()}
        for name in names:
            if _finite_dec(result[name]):
                self.preconditioners[name] = result[name]
            else:
                self._warn_once(f"decomposition:{name}", (
                    f"{type(self).__name__}: could not invert the factor blocks of module "
                    f"{name!r}, even in float64; keeping its previous preconditioner"))

    def _factors_finite(self, name: str) -> bool:
        a, g = self.factors[name]
        if all(bool(torch.isfinite(b).all()) for b in (*a, *g)):
            return True
        self._warn_once(f"nonfinite-factor:{name}", (
            f"{type(self).__name__}: the factors of module {name!r} are not finite; keeping "
            "its previous preconditioner"))
        return False

    def _update_preconditioner(self, name: str) -> None:
        self._refresh_local([name])

    def _precondition(self, name: str, mat: torch.Tensor) -> torch.Tensor:
        dec = self.preconditioners[name]
        m = mat.to(dec["inv_A"][0].dtype)
        return _blockdiag_right(_blockdiag_left(dec["inv_G"], m), dec["inv_A"])

    # --- state ------------------------------------------------------------------------------
    def _block_shapes(self, name: str) -> tuple[list[tuple], list[tuple]]:
        ad = self.adapters[name]
        g = ad.groups
        return ([(g, w, w) for w in ad.a_block_widths], [(g, w, w) for w in ad.g_block_widths])

    def state_dict(self) -> dict:
        """As :meth:`KFAC.state_dict`, with lists of blocks (``"A"``, ``"G"``, ``"inv_A"``,
        ``"inv_G"``) per module."""
        return {
            "steps": self.steps,
            "factors": {n: {"A": list(a), "G": list(g)} for n, (a, g) in self.factors.items()},
            "preconditioners": {n: {k: list(v) for k, v in d.items()}
                                for n, d in self.preconditioners.items()},
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        who = f"{type(self).__name__}.load_state_dict"
        for key in ("steps", "factors", "preconditioners"):
            if key not in state_dict:
                raise KeyError(f"{who}: state_dict has no {key!r} entry")
        loaded: dict[str, dict] = {"factors": {}, "preconditioners": {}}
        for section, keys in (("factors", ("A", "G")), ("preconditioners", ("inv_A", "inv_G"))):
            for name, entry in state_dict[section].items():
                if name not in self.adapters:
                    raise ValueError(f"{who}: state_dict has {section} for module {name!r}, "
                                     "which this preconditioner does not cover")
                if set(entry) != set(keys):
                    raise ValueError(f"{who}: {section} of module {name!r} have entries "
                                     f"{sorted(entry)}; expected {sorted(keys)}")
                want_a, want_g = self._block_shapes(name)
                device = self.adapters[name].weight.device
                for key, want in zip(keys, (want_a, want_g)):
                    got = [tuple(t.shape) for t in entry[key]]
                    if got != want:
                        raise ValueError(f"{who}: {section} {key!r} of module {name!r} have block "
                                         f"shapes {got}; expected {want} (another num_blocks or "
                                         "block_size?)")
                loaded[section][name] = {k: [t.detach().clone().to(device) for t in entry[k]]
                                         for k in keys}
        self.steps = int(state_dict["steps"])
        self.factors = {n: (p["A"], p["G"]) for n, p in loaded["factors"].items()}
        self.preconditioners = loaded["preconditioners"]
        gen_state = state_dict.get("generator")
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)
        self.capture.reset()
        self._arm_capture()


def _finite_dec(dec: dict[str, list[torch.Tensor]]) -> bool:
    return all(b is not None and bool(torch.isfinite(b).all()) for v in dec.values() for b in v)
