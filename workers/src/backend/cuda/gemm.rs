//! The projections through cuBLAS: `out[m, n] (f32) = a[m, k] (bf16) · w[n, k]ᵀ (bf16)`, accumulated in
//! f32, with `w` row-major `[out_features, in_features]` as `nn.Linear` stores it.

use std::ffi::{c_int, c_void};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

use super::device::CudaError;

/// Row-major `out = a · wᵀ` as cuBLAS's column-major `outᵀ[n, m] = w[n, k] · aᵀ[k, m]`: `w` read
/// transposed from its `[k, n]` column-major view, `a` as is.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16(
    blas: &CudaBlas,
    a: u64,
    m: usize,
    k: usize,
    w: u64,
    n: usize,
    out: u64,
    what: &str,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let dim = |value: usize| {
        c_int::try_from(value).map_err(|_| {
            CudaError::Unsupported(format!("{what}: dimension {value} exceeds cuBLAS's int"))
        })
    };
    // SAFETY: `a`, `w` and `out` are live device allocations of at least m*k, n*k (bf16) and m*n (f32)
    // elements (the caller sizes them from the model config), and the handle is bound to the stream that
    // every other launch of this backend uses, so the product runs in order with them.
    unsafe {
        gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            dim(n)?,
            dim(m)?,
            dim(k)?,
            (&alpha as *const f32).cast::<c_void>(),
            w as *const c_void,
            cudaDataType_t::CUDA_R_16BF,
            dim(k)?,
            a as *const c_void,
            cudaDataType_t::CUDA_R_16BF,
            dim(k)?,
            (&beta as *const f32).cast::<c_void>(),
            out as *mut c_void,
            cudaDataType_t::CUDA_R_32F,
            dim(n)?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|error| CudaError::Blas {
        what: format!("{what} ({m}x{k} · {n}x{k}ᵀ)"),
        status: format!("{error:?}"),
    })
}
