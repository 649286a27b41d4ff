// KFAC_HD marks the functions that both the CPU kernels (host compiler) and the CUDA kernels (nvcc)
// call, written once for both: the SINGD per-element formulas (singd_formulas.h), the bfloat16
// conversions (bf16_bits.h). __host__ __device__ under nvcc, nothing elsewhere (the CUDA emulation
// compiles the .cu files as host C++).
#pragma once

#if defined(__CUDACC__)
#define KFAC_HD __host__ __device__
#else
#define KFAC_HD
#endif
