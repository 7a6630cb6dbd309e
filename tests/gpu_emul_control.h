/*
 * gpu_emul_control.h: the fault-injection and inspection hooks of the emulated device
 * (tests/gpu_emul_runtime.h), callable from the C test suites built against it. Only the
 * emulated build (KERNELS_EMULATE) has them.
 */
#ifndef AFFINITY_GPU_EMUL_CONTROL_H
#define AFFINITY_GPU_EMUL_CONTROL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes as the CUDA runtime numbers them. */
#define EMUL_ERR_LAUNCH_OUT_OF_RESOURCES 701 /* not sticky: the context survives */
#define EMUL_ERR_ILLEGAL_ADDRESS         700 /* sticky: the context is lost */

/* The n-th next kernel launch (0: the very next) fails with `code` instead of running. A
 * sticky code poisons the emulated context for the rest of the process. */
void emul_inject_launch_failure(int after, int code);
/* Operations queued on all live streams since their last synchronization. */
uint64_t emul_pending_ops(void);
/* Kernel launches that ran so far (a test's counter for "how far into a call is launch n"). */
uint64_t emul_launch_count(void);

#ifdef __cplusplus
}
#endif

#endif
