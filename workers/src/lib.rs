//! Workers: the Qwen3 engine (model loading, backends, paged KV cache, sampling) and, later, the prefill and
//! decode roles and the KV transfer service.
//!
//! The engine takes token ids and knows nothing of the event log or of NATS. Its public surface:
//! - loading: [`load_model`] (a Hugging Face Qwen3 folder) and [`builtin_model`] (deterministic weights, no
//!   download), both giving [`ModelWeights`];
//! - [`Engine`]: sequences over a paged KV cache with prefix caching; prefill (chunked), batched decode,
//!   sampling, and [`Engine::export_kv`] / [`Engine::import_kv`] in the layout of `KV_LAYOUT.md`;
//! - [`Backend`]: the per-step forward seam ([`CpuBackend`], and [`CudaBackend`] on an NVIDIA GPU through
//!   cudarc, chosen by [`Device`]).

mod backend;
mod engine;
mod error;
mod kv_cache;
mod model;
mod rng;
pub mod roles;
mod sampling;
pub mod transfer;

pub use backend::cpu::CpuBackend;
pub use backend::cuda::{
    Ceilings, CudaBackend, CudaError, Device, DeviceKvHandle, DevicePath, cuda_device_count,
    cuda_driver_present, device_pool_reachable, measure_ceilings,
};
pub use backend::{Backend, SequenceStep};
pub use engine::{Engine, EngineConfig, FinishReason, Generation, QueuedAheadSteps, SequenceId};
pub use error::{EngineError, LoadError};
pub use kv_cache::layout::KvLayout;
pub use kv_cache::{BlockId, KvCacheEvent};
pub use model::builtin::{BUILTIN_SEED, builtin_config, builtin_model, qwen3_shape, random_model};
pub use model::config::ModelConfig;
pub use model::loader::{load_model, load_model_config};
pub use model::weights::ModelWeights;
pub use sampling::{
    DRAW_CANDIDATES, RowDraw, RowDrawParams, SampledToken, Sampler, SamplingParams, TokenLogprobs,
};
