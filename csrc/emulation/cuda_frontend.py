#!/usr/bin/env python3
"""Front end of the CUDA emulation: turns a .cu file into C++ for the host compiler.

nvcc's own front end lowers the CUDA-only syntax of a .cu file into runtime calls before the host
compiler sees it; this does the same for the emulation, so that the kernels are compiled from
exactly the sources nvcc compiles (the output is a build product, never edited or committed):

    kernel<<<grid, block[, smem[, stream]]>>>(args)
        -> ::kfac_kernels::emulation::launch<kernel>("kernel", __FILE__, __LINE__, grid, block,
                                                     smem, stream)(args)
    __shared__ [__align__(N)] T name[dims];
        -> auto& name = ::kfac_kernels::emulation::block_shared<T[dims], N>([] {});
    extern __shared__ [__align__(N)] T name[];
        -> T* const name = ::kfac_kernels::emulation::dynamic_shared<T>();

Lines are preserved (a `#line` directive names the original file), so compiler messages, __FILE__
and __LINE__ (and so the emulation's barrier reports) point into the .cu file. Like nvcc, the
output starts by including cuda_runtime.h. Anything it cannot rewrite is an error naming the line.

Usage: cuda_frontend.py INPUT.cu OUTPUT.cpp [--display-name NAME]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

NS = "::kfac_kernels::emulation"


class FrontendError(Exception):
    pass


def code_mask(text: str) -> str:
    """The text with comments and string / character literals blanked (newlines kept)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if text[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if text[k] != "\n":
                    out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def kernel_start(code: str, end: int) -> int:
    """Start of the kernel expression that ends just before `end` (an id-expression, possibly
    qualified, possibly with template arguments)."""
    i = end
    while i > 0 and code[i - 1].isspace():
        i -= 1
    if i > 0 and code[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if code[i] == ">":
                depth += 1
            elif code[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        while i > 0 and code[i - 1].isspace():
            i -= 1
    j = i
    while j > 0 and (code[j - 1].isalnum() or code[j - 1] in "_:"):
        j -= 1
    if j == i:
        raise FrontendError("cannot find the kernel before <<<")
    return j


def strip_align(decl: str) -> tuple[str, int]:
    align = 0
    m = re.search(r"__align__\s*\(\s*(\d+)\s*\)", decl)
    if m:
        align = int(m.group(1))
        decl = decl[: m.start()] + decl[m.end():]
    return " ".join(decl.split()), align


DECL = re.compile(r"^(?P<type>.*?)\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", re.S)


def rewrite(text: str) -> str:
    code = code_mask(text)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement)

    for m in re.finditer(r"<<<", code):
        start = m.start()
        close = code.find(">>>", m.end())
        if close < 0:
            raise FrontendError(f"line {line_of(text, start)}: <<< without >>>")
        try:
            k0 = kernel_start(code, start)
        except FrontendError as e:
            raise FrontendError(f"line {line_of(text, start)}: {e}") from None
        kernel = " ".join(text[k0:start].split())
        config = " ".join(text[m.end():close].split())
        span_end = close + 3
        newlines = text.count("\n", k0, span_end)
        repl = (f'{NS}::launch<{kernel}>("{kernel}", __FILE__, __LINE__, {config})'
                + "\n" * newlines)
        edits.append((k0, span_end, repl))

    for m in re.finditer(r"\bextern\s+__shared__\b([^;]*);", code):
        decl, _ = strip_align(m.group(1))
        d = DECL.match(decl)
        if not d or d.group("dims").replace(" ", "") != "[]" or not d.group("type").strip():
            raise FrontendError(f"line {line_of(text, m.start())}: cannot read the dynamic shared "
                                f"declaration '{decl}'")
        ty = d.group("type").strip()
        repl = (f"{ty}* const {d.group('name')} = {NS}::dynamic_shared<{ty}>();"
                + "\n" * text.count("\n", m.start(), m.end()))
        edits.append((m.start(), m.end(), repl))

    for m in re.finditer(r"\b__shared__\b([^;]*);", code):
        if code[max(0, m.start() - 40):m.start()].rstrip().endswith("extern"):
            continue
        decl, align = strip_align(m.group(1))
        d = DECL.match(decl)
        if not d or "=" in decl or not d.group("type").strip() \
                or re.search(r"[,\[]", re.sub(r"<[^<>]*>", "", d.group("type"))):
            raise FrontendError(f"line {line_of(text, m.start())}: cannot read the shared "
                                f"declaration '{decl}' (one variable, no initializer)")
        ty = d.group("type").strip() + " ".join(d.group("dims").split())
        repl = (f"auto& {d.group('name')} = {NS}::block_shared<{ty}, {align}>([] {{}});"
                + "\n" * text.count("\n", m.start(), m.end()))
        edits.append((m.start(), m.end(), repl))

    edits.sort()
    for (s0, e0, _), (s1, _, _) in zip(edits, edits[1:]):
        if s1 < e0:
            raise FrontendError(f"line {line_of(text, s1)}: overlapping CUDA constructs")
    out, pos = [], 0
    for s, e, r in edits:
        out.append(text[pos:s])
        out.append(r)
        pos = e
    out.append(text[pos:])
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--display-name", help="file name for compiler messages and __FILE__")
    args = ap.parse_args(argv)
    text = args.input.read_text()
    try:
        body = rewrite(text)
    except FrontendError as e:
        print(f"{args.input}: {e}", file=sys.stderr)
        return 1
    name = (args.display_name or str(args.input)).replace("\\", "/")
    header = f'#include <cuda_runtime.h>\n#line 1 "{name}"\n'
    args.output.parent.mkdir(parents=True, exist_ok=True)
    new = header + body
    if not args.output.exists() or args.output.read_text() != new:
        args.output.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
