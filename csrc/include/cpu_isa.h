// What the CPU kernels run with, torch-free declarations: the vector code path (ISA) they
// dispatch to at run time, and OpenMP. The kernels that have per-ISA code (compiled for AVX-512,
// AVX2+FMA and a baseline, csrc/cpu/gram_tiles.h) pick it with current_isa(); the ISA state is
// defined once (csrc/cpu/cpu_isa.cpp), so set_isa applies to every kernel. kfac_kernels._C
// reports it as cpu_isa() / set_cpu_isa().
#pragma once

namespace kfac_kernels {
namespace cpu {

enum Isa : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAuto = -1 };

// The code path the CPU kernels use now: the best one this CPU runs, unless set_isa forced
// another.
int current_isa();

// The same as a name: "avx512", "avx2" or "generic".
const char* isa();

// Force a code path ("generic", "avx2", "avx512") or go back to the best one ("auto"). Returns
// false, changing nothing, for an unknown name or a path this CPU cannot run. Process-wide; meant
// for tests and benchmarks.
bool set_isa(const char* name);

// Threads an OpenMP parallel region would use now (1 without OpenMP).
int max_threads();

// True when the kernel library was compiled with OpenMP.
bool with_openmp();

}  // namespace cpu
}  // namespace kfac_kernels
