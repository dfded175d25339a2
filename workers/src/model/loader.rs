//! Loading a Hugging Face Qwen3 folder: `config.json` plus safetensors weights (one `model.safetensors`, or
//! shards listed by `model.safetensors.index.json`), memory-mapped and converted to f32 from f32, f16 or bf16.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::config::ModelConfig;
use super::weights::{ModelWeights, TensorSpec};
use crate::error::LoadError;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Loads the Qwen3 checkpoint in `dir`. Errors name the file and tensor at fault.
/// Reads only `config.json` of a Qwen3 folder, for roles that need the model's shape and not its weights.
pub fn load_model_config(dir: &Path) -> Result<ModelConfig, LoadError> {
    let config_path = dir.join("config.json");
    ModelConfig::from_json(&config_path, &read_json(&config_path)?)
}

pub fn load_model(dir: &Path) -> Result<ModelWeights, LoadError> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_json(&config_path, &read_json(&config_path)?)?;
    let store = TensorStore::open(dir)?;
    ModelWeights::from_tensors(config, |spec| store.read_f32(spec))
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

struct MappedFile {
    path: PathBuf,
    bytes: Mmap,
}

struct TensorLocation {
    file_index: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start_byte: usize,
    end_byte: usize,
}

/// Every tensor of the checkpoint's safetensors files, by name, without reading their data yet.
struct TensorStore {
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorLocation>,
    /// For error messages: which files were searched.
    searched: String,
}

impl TensorStore {
    fn open(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (file_names, searched) = if index_path.exists() {
            let index = read_json(&index_path)?;
            let Some(weight_map) = index.get("weight_map").and_then(Value::as_object) else {
                return Err(LoadError::SafeTensors {
                    path: index_path,
                    message: "no `weight_map` object".into(),
                });
            };
            let mut names = BTreeSet::new();
            for (tensor, file) in weight_map {
                let Some(file) = file.as_str() else {
                    return Err(LoadError::SafeTensors {
                        path: index_path,
                        message: format!("weight_map entry for `{tensor}` is not a file name"),
                    });
                };
                names.insert(file.to_owned());
            }
            let searched = format!("{} ({} shards)", index_path.display(), names.len());
            (names.into_iter().collect::<Vec<_>>(), searched)
        } else if single_path.exists() {
            (
                vec![SINGLE_FILE.to_owned()],
                single_path.display().to_string(),
            )
        } else {
            return Err(LoadError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (file_index, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let io_error = |source| LoadError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(&path).map_err(io_error)?;
            // SAFETY: the mapping is read-only and lives in `files` for as long as slices of it are read;
            // a checkpoint truncated by another process while we load it is outside what we defend against.
            let bytes = unsafe { Mmap::map(&file) }.map_err(io_error)?;
            let (header_bytes, metadata) =
                SafeTensors::read_metadata(&bytes).map_err(|error| LoadError::SafeTensors {
                    path: path.clone(),
                    message: error.to_string(),
                })?;
            let data_start = 8 + header_bytes;
            for (tensor, info) in metadata.tensors() {
                tensors.insert(
                    tensor,
                    TensorLocation {
                        file_index,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start_byte: data_start + info.data_offsets.0,
                        end_byte: data_start + info.data_offsets.1,
                    },
                );
            }
            files.push(MappedFile { path, bytes });
        }
        Ok(Self {
            files,
            tensors,
            searched,
        })
    }

    fn read_f32(&self, spec: &TensorSpec) -> Result<Vec<f32>, LoadError> {
        let Some(location) = self.tensors.get(&spec.name) else {
            return Err(LoadError::MissingTensor {
                tensor: spec.name.clone(),
                searched: self.searched.clone(),
            });
        };
        let file = &self.files[location.file_index];
        if location.shape != spec.shape {
            return Err(LoadError::ShapeMismatch {
                tensor: spec.name.clone(),
                path: file.path.clone(),
                expected: spec.shape.clone(),
                found: location.shape.clone(),
            });
        }
        let element_bytes = match location.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(LoadError::UnsupportedDtype {
                    tensor: spec.name.clone(),
                    path: file.path.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let num_elements: usize = spec.shape.iter().product();
        let data = file
            .bytes
            .get(location.start_byte..location.end_byte)
            .filter(|data| data.len() == num_elements * element_bytes)
            .ok_or_else(|| LoadError::SafeTensors {
                path: file.path.clone(),
                message: format!(
                    "tensor `{}`: byte range {}..{} does not hold {num_elements} {:?} elements",
                    spec.name, location.start_byte, location.end_byte, location.dtype
                ),
            })?;
        let mut out = vec![0.0f32; num_elements];
        const CHUNK_ELEMENTS: usize = 1 << 16;
        let convert: fn(&[u8]) -> f32 = match location.dtype {
            Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
        out.par_chunks_mut(CHUNK_ELEMENTS)
            .zip(data.par_chunks(CHUNK_ELEMENTS * element_bytes))
            .for_each(|(dst, src)| {
                for (value, bytes) in dst.iter_mut().zip(src.chunks_exact(element_bytes)) {
                    *value = convert(bytes);
                }
            });
        Ok(out)
    }
}
