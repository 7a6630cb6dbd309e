/*
 * The kernels library built for the CPU, for tests: every .cu of kernels/ except the benchmark
 * timers, compiled as C++ in one translation unit against tests/gpu_emul_runtime.h (the CUDA
 * runtime, cuBLAS and thread blocks emulated). The .cu files are included on purpose: this
 * file is their second build, not a copy of them.
 */
#ifndef KERNELS_EMULATE
#define KERNELS_EMULATE 1
#endif
/* Small score tiles: the tests' small tables still span several tiles. */
#define SEARCH_TILE_BUDGET ((uint64_t)512 << 10)

#include "als.cu"
#include "device.cu"
#include "gather_dot.cu"
#include "search.cu"
#include "search_fused.cu"
#include "select_block.cu"
#include "select_radix.cu"
#include "table.cu"

#include "gpu_emul_control.h"

extern "C" void emul_inject_launch_failure(int after, int code)
{
    emul_fail_launch_code = code;
    emul_fail_launch_after = after;
}

extern "C" uint64_t emul_pending_ops(void)
{
    return emul_pending_total();
}

extern "C" uint64_t emul_launch_count(void)
{
    return emul_launches.load();
}
