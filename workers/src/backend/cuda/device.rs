//! Opening a GPU for the CUDA backend: checks that the driver, cuBLAS and NVRTC libraries can be loaded
//! (cudarc loads them lazily and panics when one is missing, so this must come before any cudarc call),
//! picks the device, and creates its context, stream and cuBLAS handle. Also [`CudaError`], the backend's
//! error type.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream, DriverError};

/// Why the CUDA backend could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA driver on this machine (libcuda could not be loaded): install the NVIDIA driver, or run with --device cpu"
    )]
    NoDriver,
    #[error(
        "{library} could not be loaded: the CUDA backend needs the CUDA {library} library on the library path (LD_LIBRARY_PATH)"
    )]
    MissingLibrary { library: &'static str },
    #[error("cuda:{ordinal} does not exist: the driver sees {count} GPU(s)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("{what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    #[error("{what}: cuBLAS error {status}")]
    Blas { what: String, status: String },
    #[error("compiling the CUDA kernels with NVRTC failed: {0}")]
    Compile(String),
    #[error(
        "the model does not fit on cuda:{ordinal}: it needs {needed_mib} MiB (weights {weights_mib} MiB, KV cache {kv_mib} MiB, work buffers {scratch_mib} MiB) and {free_mib} MiB are free; use fewer --kv-blocks or a larger GPU"
    )]
    DoesNotFit {
        ordinal: usize,
        needed_mib: usize,
        weights_mib: usize,
        kv_mib: usize,
        scratch_mib: usize,
        free_mib: usize,
    },
    #[error("the CUDA backend does not support this model: {0}")]
    Unsupported(String),
}

/// Adds what was being done to a driver error.
pub(crate) trait DriverContext<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, CudaError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver {
            what: what(),
            source,
        })
    }
}

/// Parses `cpu` or `cuda:N` (also `cuda`, meaning `cuda:0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device {text:?} is neither `cpu` nor `cuda:N`")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Whether a CUDA driver can be loaded here; tests that need a GPU skip when it is false.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// How many GPUs the driver sees: 0 where no driver loads or it fails to start (a driver without a GPU).
pub fn cuda_device_count() -> usize {
    if !cuda_driver_present() {
        return 0;
    }
    CudaContext::device_count()
        .ok()
        .and_then(|count| usize::try_from(count).ok())
        .unwrap_or(0)
}

/// One GPU: its context, the one stream every step runs on, and a cuBLAS handle bound to that stream.
pub(crate) struct GpuContext {
    pub(crate) ordinal: usize,
    pub(crate) context: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) multiprocessors: usize,
}

impl GpuContext {
    pub(crate) fn open(ordinal: usize) -> Result<Self, CudaError> {
        if !cuda_driver_present() {
            return Err(CudaError::NoDriver);
        }
        // SAFETY: as above, each only tries to dlopen its library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::MissingLibrary { library: "cuBLAS" });
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::MissingLibrary { library: "NVRTC" });
        }
        let count = CudaContext::device_count().during(|| {
            "the CUDA driver loads but could not start (is a GPU visible to this process?)".into()
        })?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        let context =
            CudaContext::new(ordinal).during(|| format!("creating a context on cuda:{ordinal}"))?;
        // Every launch goes on one stream, in order, so cudarc's per-buffer event tracking is pure overhead.
        // SAFETY: this backend never uses a second stream, so no cross-stream ordering is lost.
        unsafe { context.disable_event_tracking() };
        let stream = context
            .new_stream()
            .during(|| format!("creating a stream on cuda:{ordinal}"))?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|error| CudaError::Blas {
            what: format!("creating a cuBLAS handle on cuda:{ordinal}"),
            status: format!("{error:?}"),
        })?;
        let multiprocessors = context
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .during(|| "reading the multiprocessor count".into())?;
        Ok(Self {
            ordinal,
            context,
            stream,
            blas,
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(1).max(1),
        })
    }

    /// Free and total device memory in bytes.
    pub(crate) fn memory(&self) -> Result<(usize, usize), CudaError> {
        self.context
            .mem_get_info()
            .during(|| format!("reading free memory on cuda:{}", self.ordinal))
    }
}
