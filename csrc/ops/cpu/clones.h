// DYNEXEC_CPU_CLONES: marks a CPU kernel function to be compiled twice, for baseline
// x86-64 (SSE2, what the extension targets) and for x86-64-v3 (AVX2 + FMA), with the
// version picked once when the library is loaded (GCC target_clones, an ifunc). The
// vectorised loops of the marked functions then run on 8 float lanes where the CPU has
// them. Only plain functions can be marked (not lambdas); everything they call on vector
// data must be inlined into them. Define DYNEXEC_NO_CPU_CLONES to build the baseline
// version only (e.g. to test it on an AVX2 machine).
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(DYNEXEC_NO_CPU_CLONES)
#define DYNEXEC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DYNEXEC_CPU_CLONES
#endif
