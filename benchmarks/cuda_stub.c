/* A no-op stand-in for the CUDA driver (libcuda.so.1), so that Triton builds and runs its real
 * CUDA launchers on a machine without a GPU: Triton 3.6's per-signature C module and Triton 3.9's
 * generic one, with all their argument handling. benchmarks/host_cost.py compiles it with gcc and
 * loads it before Triton links its launchers against "libcuda.so.1".
 *
 * The device is one sm_90 GPU (132 SMs, 227 KB of opt-in shared memory per block); every call
 * succeeds; a pointer is its own device address; a launch does nothing but count itself and keep
 * its configuration (fastrank_stub_launches, fastrank_stub_last_launch).
 *
 * Only the entry points Triton 3.6 and 3.9 call are defined, with the driver's C ABI (handles are
 * pointers, CUdevice and enums are int, CUdeviceptr is a 64-bit integer).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult;
typedef uint64_t CUdeviceptr;

typedef struct {
  unsigned int gridDimX, gridDimY, gridDimZ;
  unsigned int blockDimX, blockDimY, blockDimZ;
  unsigned int sharedMemBytes;
  void *hStream;
  void *attrs;
  unsigned int numAttrs;
} CUlaunchConfig;

/* What the last launch asked for: grid x, y, z, block x, dynamic shared memory, stream, function. */
typedef struct {
  uint64_t grid[3];
  uint64_t block_x;
  uint64_t shared;
  uint64_t stream;
  uint64_t function;
} LaunchRecord;

uint64_t fastrank_stub_launches = 0;
LaunchRecord fastrank_stub_last_launch;

static int context_token, module_token, function_token;

CUresult cuInit(unsigned int flags) { return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 12080; return 0; }
CUresult cuGetErrorString(CUresult error, const char **text) { *text = "stubbed CUDA driver"; return 0; }
CUresult cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return 0; }

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  switch (attribute) {
  case 1: *value = 1024; break;    /* max threads per block */
  case 10: *value = 32; break;     /* warp size */
  case 12: *value = 65536; break;  /* registers per block */
  case 13: *value = 1980000; break; /* SM clock, kHz */
  case 16: *value = 132; break;    /* multiprocessors */
  case 36: *value = 2619000; break; /* memory clock, kHz */
  case 37: *value = 5120; break;   /* memory bus width, bits */
  case 75: *value = 9; break;      /* compute capability major */
  case 76: *value = 0; break;      /* compute capability minor */
  case 81: *value = 233472; break; /* shared memory per multiprocessor */
  case 97: *value = 232448; break; /* opt-in shared memory per block */
  default: *value = 0;
  }
  return 0;
}

CUresult cuDevicePrimaryCtxRetain(void **context, int device) { *context = &context_token; return 0; }
CUresult cuCtxGetCurrent(void **context) { *context = &context_token; return 0; }
CUresult cuCtxSetCurrent(void *context) { return 0; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return 0; }
CUresult cuCtxGetLimit(size_t *value, int limit) { *value = 0; return 0; }
CUresult cuCtxSetLimit(int limit, size_t value) { return 0; }

CUresult cuModuleLoadData(void **module, const void *image) { *module = &module_token; return 0; }
CUresult cuModuleUnload(void *module) { return 0; }
CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
  *function = &function_token;
  return 0;
}

CUresult cuFuncGetAttribute(int *value, int attribute, void *function) {
  *value = attribute == 0 ? 1024 : 0; /* max threads per block; no registers, spills or static smem */
  return 0;
}
CUresult cuFuncSetAttribute(void *function, int attribute, int value) { return 0; }
CUresult cuFuncSetCacheConfig(void *function, int config) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *clusters, void *function, const CUlaunchConfig *config) {
  *clusters = 1;
  return 0;
}

CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr pointer) {
  if (attribute == 3) /* CU_POINTER_ATTRIBUTE_DEVICE_POINTER */
    *(CUdeviceptr *)data = pointer;
  return 0;
}
CUresult cuPointerGetAttributes(unsigned int count, int *attributes, void **data, CUdeviceptr pointer) {
  for (unsigned int i = 0; i < count; ++i)
    if (attributes[i] == 3)
      *(CUdeviceptr *)data[i] = pointer;
  return 0;
}

CUresult cuStreamIsCapturing(void *stream, int *status) { *status = 0; return 0; }

CUresult cuTensorMapEncodeTiled(void *map, int dtype, unsigned int rank, void *address, const uint64_t *dims,
                                const uint64_t *strides, const unsigned int *box, const unsigned int *element_strides,
                                int interleave, int swizzle, int promotion, int fill) {
  memset(map, 0, 128);
  return 0;
}
CUresult cuTensorMapEncodeIm2col(void *map, int dtype, unsigned int rank, void *address, const uint64_t *dims,
                                 const uint64_t *strides, const int *lower, const int *upper, unsigned int channels,
                                 unsigned int pixels, const unsigned int *element_strides, int interleave,
                                 int swizzle, int promotion, int fill) {
  memset(map, 0, 128);
  return 0;
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, void *function, void **params, void **extra) {
  fastrank_stub_launches += 1;
  fastrank_stub_last_launch.grid[0] = config->gridDimX;
  fastrank_stub_last_launch.grid[1] = config->gridDimY;
  fastrank_stub_last_launch.grid[2] = config->gridDimZ;
  fastrank_stub_last_launch.block_x = config->blockDimX;
  fastrank_stub_last_launch.shared = config->sharedMemBytes;
  fastrank_stub_last_launch.stream = (uint64_t)(uintptr_t)config->hStream;
  fastrank_stub_last_launch.function = (uint64_t)(uintptr_t)function;
  return 0;
}
