//! [`measure_ceilings`]: the two rates a GPU step is judged against, measured on the GPU at hand rather
//! than taken from a datasheet: device memory bandwidth (a large device-to-device copy, bytes read plus
//! written) and the bf16 GEMM rate through the same cuBLAS call the projections use; plus the pinned host ↔
//! device copy rate, the ceiling of a KV transfer that leaves the GPU.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr};

use super::device::{CudaError, DriverContext, GpuContext};
use super::gemm::matmul_bf16;

/// Measured rates of one GPU.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Device memory bandwidth: bytes read plus bytes written per second by a device-to-device copy.
    pub copy_bytes_per_s: f64,
    /// bf16 × bf16 → f32 GEMM rate in FLOP/s (8192³ through cuBLAS).
    pub gemm_flops_per_s: f64,
    /// Pinned host → device bytes per second.
    pub host_to_device_bytes_per_s: f64,
    /// Device → pinned host bytes per second.
    pub device_to_host_bytes_per_s: f64,
}

const COPY_BYTES: usize = 1 << 30;
const GEMM_SIZE: usize = 8192;
const PINNED_BYTES: usize = 256 << 20;
const REPEATS: usize = 10;

/// Runs `work` once to warm up, then `REPEATS` times between two events; returns the median seconds.
fn time(
    gpu: &GpuContext,
    what: &str,
    mut work: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    work()?;
    let mut samples = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let start = gpu
            .context
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .during(|| format!("creating an event for {what}"))?;
        let end = gpu
            .context
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .during(|| format!("creating an event for {what}"))?;
        start
            .record(&gpu.stream)
            .during(|| format!("timing {what}"))?;
        work()?;
        end.record(&gpu.stream)
            .during(|| format!("timing {what}"))?;
        end.synchronize().during(|| format!("timing {what}"))?;
        let ms = start.elapsed_ms(&end).during(|| format!("timing {what}"))?;
        samples.push(f64::from(ms) / 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[REPEATS / 2])
}

/// Measures the ceilings of `cuda:{ordinal}` (about a second of GPU time, 2.3 GiB of device memory).
pub fn measure_ceilings(ordinal: usize) -> Result<Ceilings, CudaError> {
    let gpu = GpuContext::open(ordinal)?;
    let alloc_u8 = |len: usize, what: &str| -> Result<CudaSlice<u8>, CudaError> {
        gpu.stream
            .alloc_zeros::<u8>(len)
            .during(|| format!("allocating {what}"))
    };

    let source = alloc_u8(COPY_BYTES, "the copy source")?;
    let mut target = alloc_u8(COPY_BYTES, "the copy target")?;
    let copy_seconds = time(&gpu, "a device copy", || {
        gpu.stream
            .memcpy_dtod(&source, &mut target)
            .during(|| "copying on the device".into())
    })?;
    drop((source, target));

    // Random-looking bf16 operands: a GEMM on zeros runs faster than on real data.
    let elements = GEMM_SIZE * GEMM_SIZE;
    let bits: Vec<u16> = (0..elements as u64)
        .map(|i| {
            let mixed = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            half::bf16::from_f32((mixed % 2001) as f32 / 1000.0 - 1.0).to_bits()
        })
        .collect();
    let a = gpu
        .stream
        .clone_htod(&bits)
        .during(|| "uploading GEMM operands".into())?;
    let w = gpu
        .stream
        .clone_htod(&bits)
        .during(|| "uploading GEMM operands".into())?;
    let out = gpu
        .stream
        .alloc_zeros::<f32>(elements)
        .during(|| "allocating the GEMM output".into())?;
    let (a_ptr, _a) = a.device_ptr(&gpu.stream);
    let (w_ptr, _w) = w.device_ptr(&gpu.stream);
    let (out_ptr, _out) = out.device_ptr(&gpu.stream);
    let gemm_seconds = time(&gpu, "a bf16 GEMM", || {
        matmul_bf16(
            &gpu.blas,
            a_ptr,
            GEMM_SIZE,
            GEMM_SIZE,
            w_ptr,
            GEMM_SIZE,
            out_ptr,
            "the GEMM ceiling",
        )
    })?;

    let mut device = alloc_u8(PINNED_BYTES, "the pinned-copy buffer")?;
    // SAFETY: the pinned buffer is fully written by the first device-to-host copy before anything reads it.
    let mut pinned = unsafe {
        gpu.context
            .alloc_pinned_with_flags::<u8>(PINNED_BYTES, 0)
            .during(|| "allocating pinned host memory".into())?
    };
    let device_to_host_seconds = time(&gpu, "a device to host copy", || {
        gpu.stream
            .memcpy_dtoh(&device, &mut pinned)
            .during(|| "copying to pinned host memory".into())
    })?;
    let host_to_device_seconds = time(&gpu, "a host to device copy", || {
        gpu.stream
            .memcpy_htod(&pinned, &mut device)
            .during(|| "copying from pinned host memory".into())
    })?;

    Ok(Ceilings {
        copy_bytes_per_s: 2.0 * COPY_BYTES as f64 / copy_seconds,
        gemm_flops_per_s: 2.0 * (GEMM_SIZE as f64).powi(3) / gemm_seconds,
        host_to_device_bytes_per_s: PINNED_BYTES as f64 / host_to_device_seconds,
        device_to_host_bytes_per_s: PINNED_BYTES as f64 / device_to_host_seconds,
    })
}
