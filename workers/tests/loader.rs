//! Loading checkpoints: every dtype and layout loads (the parity tests check the values), and a broken
//! folder gives an error that names the file and tensor at fault, never a panic.

mod common;

use std::path::Path;

use common::{FIXTURES, fixture_dir};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tandem_workers::{LoadError, load_model};

const UNTIED: &str = "tiny_f32_untied_t5";

/// Copies a fixture's config and rewrites its weights through `edit`, which gets every tensor as
/// (name, dtype, shape, bytes) and returns the ones to save.
fn broken_checkpoint(
    dir: &Path,
    edit: impl FnOnce(
        Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    let source = fixture_dir(UNTIED);
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let all = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    let edited = edit(all);
    let views: Vec<(String, TensorView<'_>)> = edited
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn every_fixture_loads_with_its_config() {
    for name in FIXTURES {
        let model = load_model(&fixture_dir(name)).unwrap();
        let config = model.config();
        assert!(config.head_dim * config.num_q_heads > 0);
        assert_eq!(
            config.tie_word_embeddings,
            name.contains("tied") && !name.contains("untied")
        );
    }
    let t4 = load_model(&fixture_dir("tiny_bf16_tied_t4")).unwrap();
    assert_eq!(
        t4.config().rope_theta,
        10_000.0,
        "transformers-4 layout: top-level rope_theta"
    );
    assert_eq!(
        t4.config().head_dim,
        32,
        "head_dim differs from hidden/heads = 16"
    );
    let t5 = load_model(&fixture_dir("tiny_f16_sharded_t5")).unwrap();
    assert_eq!(
        t5.config().rope_theta,
        1_000_000.0,
        "transformers-5 layout: rope_parameters"
    );
}

#[test]
fn a_folder_that_is_not_qwen3_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    broken_checkpoint(dir.path(), |tensors| tensors);
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["model_type"] = "llama".into();
    config["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let error = load_model(dir.path()).err().unwrap();
    assert!(matches!(error, LoadError::NotQwen3 { .. }));
    let message = error.to_string();
    assert!(
        message.contains("not a Qwen3")
            && message.contains("llama")
            && message.contains("config.json"),
        "{message}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    broken_checkpoint(dir.path(), |tensors| {
        tensors
            .into_iter()
            .filter(|t| t.0 != "model.layers.1.mlp.down_proj.weight")
            .collect()
    });
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(
        message.contains("`model.layers.1.mlp.down_proj.weight` is missing"),
        "{message}"
    );

    let dir = tempfile::tempdir().unwrap();
    broken_checkpoint(dir.path(), |tensors| {
        tensors
            .into_iter()
            .filter(|t| t.0 != "lm_head.weight")
            .collect()
    });
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(
        message.contains("`lm_head.weight` is missing"),
        "untied checkpoints need lm_head: {message}"
    );
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    broken_checkpoint(dir.path(), |tensors| {
        tensors
            .into_iter()
            .map(|(name, dtype, shape, data)| {
                if name == "model.layers.0.self_attn.k_proj.weight" {
                    // One output row short.
                    let row_bytes = shape[1] * 4;
                    (
                        name,
                        dtype,
                        vec![shape[0] - 1, shape[1]],
                        data[row_bytes..].to_vec(),
                    )
                } else {
                    (name, dtype, shape, data)
                }
            })
            .collect()
    });
    let error = load_model(dir.path()).err().unwrap();
    let message = error.to_string();
    match error {
        LoadError::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        } => {
            assert_eq!(tensor, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!(expected, vec![32, 128]);
            assert_eq!(found, vec![31, 128]);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
    assert!(
        message.contains("k_proj")
            && message.contains("[32, 128]")
            && message.contains("[31, 128]"),
        "{message}"
    );
}

#[test]
fn an_unsupported_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    broken_checkpoint(dir.path(), |tensors| {
        tensors
            .into_iter()
            .map(|(name, dtype, shape, data)| {
                if name == "model.norm.weight" {
                    (name, Dtype::I32, shape, data)
                } else {
                    (name, dtype, shape, data)
                }
            })
            .collect()
    });
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(
        message.contains("model.norm.weight") && message.contains("I32"),
        "{message}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(message.contains("config.json"), "{message}");

    std::fs::copy(
        fixture_dir(UNTIED).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(message.contains("no model.safetensors"), "{message}");

    // An index that names a shard which is not there.
    let sharded = fixture_dir("tiny_f16_sharded_t5");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&sharded).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name != "model-00003-of-00005.safetensors" {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(
        message.contains("model-00003-of-00005.safetensors"),
        "{message}"
    );

    std::fs::write(
        dir.path().join("model-00003-of-00005.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let message = load_model(dir.path()).err().unwrap().to_string();
    assert!(
        message.contains("model-00003-of-00005.safetensors")
            && message.contains("invalid safetensors"),
        "{message}"
    );
}
