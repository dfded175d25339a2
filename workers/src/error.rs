//! The crate's error types: [`LoadError`] for reading a checkpoint, [`EngineError`] for running one.

use std::path::PathBuf;

/// Why a model folder could not be loaded. Every variant names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: not a Qwen3 checkpoint (model_type {model_type:?}, architectures {architectures:?}); expected model_type \"qwen3\" or architecture \"Qwen3ForCausalLM\""
    )]
    NotQwen3 {
        path: PathBuf,
        model_type: Option<String>,
        architectures: Vec<String>,
    },
    #[error("{path}: config field `{field}`: {problem}")]
    Config {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path}: invalid safetensors file: {message}")]
    SafeTensors { path: PathBuf, message: String },
    #[error("tensor `{tensor}` is missing (looked in {searched})")]
    MissingTensor { tensor: String, searched: String },
    #[error("tensor `{tensor}` in {path}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        tensor: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{tensor}` in {path}: unsupported dtype {dtype}; expected F32, F16 or BF16")]
    UnsupportedDtype {
        tensor: String,
        path: PathBuf,
        dtype: String,
    },
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token_id} is outside the vocabulary ({vocab_size} tokens)")]
    TokenOutOfVocabulary { token_id: u32, vocab_size: usize },
    #[error("KV cache is full: {needed_blocks} more blocks needed, {free_blocks} free")]
    OutOfBlocks {
        needed_blocks: usize,
        free_blocks: usize,
    },
    #[error(
        "sequence {sequence_id} has {pending_tokens} prompt tokens not prefilled yet; prefill before decoding"
    )]
    NotPrefilled {
        sequence_id: u64,
        pending_tokens: usize,
    },
    #[error("sequence {0} appears twice in one decode batch")]
    DuplicateInBatch(u64),
    #[error("KV import: {0}")]
    KvImport(String),
    #[error("the last step's logits are not available: {0}")]
    LogitsNotKept(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Cuda(#[from] crate::backend::cuda::CudaError),
}
