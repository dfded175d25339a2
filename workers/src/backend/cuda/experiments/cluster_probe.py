"""How many thread block clusters of each size (1..16) a GPU holds at once, at one and at two blocks of 256 threads
a multiprocessor (by the shared memory each block asks for): cuOccupancyMaxActiveClusters on an empty kernel.
Needs only the driver: python3 cluster_probe.py. PERF.md ("Stop 22's change") has the H100's answer."""
import ctypes

PTX = b""".version 8.0
.target sm_90
.address_size 64
.visible .entry probe()
.maxntid 256, 1, 1
{
	ret;
}
"""
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


class LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("x", ctypes.c_uint), ("y", ctypes.c_uint),
                ("z", ctypes.c_uint), ("rest", ctypes.c_char * 52)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


def check(result, what):
    if result != 0:
        raise SystemExit(f"{what}: CUresult {result}")


def main():
    cuda = ctypes.CDLL("libcuda.so.1")
    check(cuda.cuInit(0), "cuInit")
    device, context = ctypes.c_int(), ctypes.c_void_p()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    check(cuda.cuModuleLoadData(ctypes.byref(module), PTX), "cuModuleLoadData")
    check(cuda.cuModuleGetFunction(ctypes.byref(function), module, b"probe"), "cuModuleGetFunction")
    check(cuda.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 200 * 1024),
          "allowing 200 KiB of shared memory")
    check(cuda.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
          "allowing clusters of 16")
    # 228 KiB of shared memory a multiprocessor on sm_90: 120 KiB a block allows one, 112 KiB two.
    for blocks_per_sm, shared_kib in ((1, 120), (2, 112)):
        counts = []
        for size in range(1, 17):
            attribute = LaunchAttribute(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, b"", size, 1, 1, b"")
            config = LaunchConfig((size, 1, 1), (256, 1, 1), shared_kib * 1024, None, ctypes.pointer(attribute), 1)
            clusters = ctypes.c_int()
            check(cuda.cuOccupancyMaxActiveClusters(ctypes.byref(clusters), function, ctypes.byref(config)),
                  f"cuOccupancyMaxActiveClusters({size})")
            counts.append(f"{size}:{clusters.value}")
        print(f"{blocks_per_sm} block(s) a multiprocessor:", " ".join(counts))


if __name__ == "__main__":
    main()
