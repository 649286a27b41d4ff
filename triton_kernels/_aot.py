r"""The launch configurations of the Triton kernels, for compiling them ahead of time.

Every kernel module has a ``launch_configs()`` that lists each configuration its launcher can
pick on a GPU (constexprs, ``num_warps``, the element types of its pointers), derived from the
same choice functions the launcher calls. ``bench/triton_static.py`` compiles all of them for
sm_80 and sm_90 without a GPU and records registers, spills and shared memory; the tests compile
them too (``tests/test_triton_aot.py``).
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["KernelConfig", "all_configs"]

MODULES = ("block_eigh", "patch_covariance", "singd_block_factor_update", "singd_block_step",
           "singd_diagonal_factor_update", "singd_diagonal_step", "symmetric_factor_update")


class KernelConfig(NamedTuple):
    """One compiled variant of a ``@triton.jit`` kernel.

    ``pointers`` gives the element type (``"fp32"``, ``"bf16"``, ``"i64"``, ...) of every
    parameter named ``*_ptr``; ``scalars`` the type of every scalar parameter that is not an
    ``i32`` and has no annotation of its own (a float passed as ``fp32``, say).

    What a launch specialises on at run time and the compiled code depends on is stated here
    too, as the launcher guarantees it at the target shapes: ``ones``, parameters equal to 1
    (a unit stride: Triton compiles it as a constant), and ``aligned``, parameters (pointers
    or integers) divisible by 16 (Triton's ``tt.divisibility``; what lets it prove that loads
    are contiguous and aligned, and vectorise or copy them asynchronously). ``num_stages`` is
    the software-pipelining depth of the launch (Triton's default, 3, unless set).
    """
    kernel: object
    constexprs: dict
    pointers: dict
    num_warps: int = 4
    scalars: dict = {}
    num_stages: int = 3
    ones: tuple = ()
    aligned: tuple = ()

    @property
    def name(self) -> str:
        """``module.kernel``, e.g. ``singd_block_step._step_kernel``."""
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.__name__}"

    def key(self) -> str:
        """``name[CONST=value,...;ptr=type,...;w=num_warps]``: what makes the variant."""
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                          for k, v in sorted(self.constexprs.items()))
        types = ",".join(f"{k}={v}" for k, v in sorted(self.pointers.items()))
        extra = "".join((f";s={self.num_stages}" if self.num_stages != 3 else "",
                         f";ones={','.join(self.ones)}" if self.ones else "",
                         f";aligned={','.join(self.aligned)}" if self.aligned else ""))
        return f"{self.name}[{consts};{types};w={self.num_warps}{extra}]"

    def all_constexprs(self) -> dict:
        """The constexprs and the parameters compiled as the constant 1 (``ones``)."""
        return {**self.constexprs, **{name: 1 for name in self.ones}}

    def attrs(self) -> dict:
        """``ASTSource``'s ``attrs``: ``tt.divisibility`` 16 for every ``aligned`` parameter."""
        names = [p.name for p in self.kernel.params]
        return {(names.index(n),): [["tt.divisibility", 16]] for n in self.aligned}

    def options(self) -> dict:
        """``triton.compile``'s options: warps and pipelining depth."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def signature(self) -> dict:
        """Triton's ``ASTSource`` signature: ``*<type>`` per pointer, ``constexpr``, scalars."""
        out = {}
        for p in self.kernel.params:
            if p.is_constexpr or p.name in self.ones:
                out[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                out[p.name] = "*" + self.pointers[p.name]
            elif p.name in self.scalars:
                out[p.name] = self.scalars[p.name]
            elif p.annotation:
                out[p.name] = str(p.annotation).replace("tl.", "").replace("float", "fp")
            else:
                out[p.name] = "i32"
        missing = {p.name for p in self.kernel.params if p.name.endswith("_ptr")} - set(
            self.pointers)
        unknown = (set(self.ones) | set(self.aligned)) - {p.name for p in self.kernel.params}
        if missing or unknown or set(self.constexprs) != {p.name for p in self.kernel.params
                                                          if p.is_constexpr}:
            raise ValueError(f"{self.name}: pointers {sorted(missing)} have no type, "
                             f"{sorted(unknown)} are not parameters, or the constexprs "
                             f"{sorted(self.constexprs)} are not the kernel's")
        return out


def all_configs() -> list[KernelConfig]:
    """Every kernel module's configurations, each variant once."""
    import importlib

    seen, out = set(), []
    for name in MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for cfg in module.launch_configs():
            if cfg.key() not in seen:
                seen.add(cfg.key())
                out.append(cfg)
    return out
