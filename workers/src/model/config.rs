//! [`ModelConfig`]: the Qwen3 hyper-parameters, parsed from a Hugging Face `config.json` in either layout seen
//! in the wild (transformers 4: top-level `rope_theta`, `torch_dtype`; transformers 5: `rope_parameters`,
//! `dtype`).

use std::path::Path;

use serde_json::Value;

use crate::error::LoadError;

/// The shape of a Qwen3 decoder. `head_dim` is explicit because Qwen3 checkpoints often have
/// `head_dim != hidden_size / num_attention_heads`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_q_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parses a `config.json` document; `path` only labels errors.
    pub fn from_json(path: &Path, document: &Value) -> Result<Self, LoadError> {
        let config_error = |field: &'static str, problem: String| LoadError::Config {
            path: path.to_path_buf(),
            field,
            problem,
        };
        let Some(object) = document.as_object() else {
            return Err(config_error("<root>", "expected a JSON object".into()));
        };
        let model_type = object
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let architectures: Vec<String> = object
            .get("architectures")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let is_qwen3 = match model_type.as_deref() {
            Some(kind) => kind == "qwen3",
            None => architectures.iter().any(|name| name == "Qwen3ForCausalLM"),
        };
        if !is_qwen3 {
            return Err(LoadError::NotQwen3 {
                path: path.to_path_buf(),
                model_type,
                architectures,
            });
        }

        let required_usize = |field: &'static str| -> Result<usize, LoadError> {
            match object.get(field) {
                Some(value) => value
                    .as_u64()
                    .filter(|&v| v > 0)
                    .map(|v| v as usize)
                    .ok_or_else(|| {
                        config_error(field, format!("expected a positive integer, found {value}"))
                    }),
                None => Err(config_error(field, "missing".into())),
            }
        };
        let optional_usize = |field: &'static str| -> Result<Option<usize>, LoadError> {
            match object.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => required_usize(field).map(Some),
            }
        };
        let optional_f64 =
            |field: &'static str, value: Option<&Value>| -> Result<Option<f64>, LoadError> {
                match value {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                        config_error(field, format!("expected a number, found {v}"))
                    }),
                }
            };

        let hidden_size = required_usize("hidden_size")?;
        let num_q_heads = required_usize("num_attention_heads")?;
        let num_kv_heads = optional_usize("num_key_value_heads")?.unwrap_or(num_q_heads);
        if num_q_heads % num_kv_heads != 0 {
            return Err(config_error(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_q_heads}"),
            ));
        }
        let head_dim = match optional_usize("head_dim")? {
            Some(dim) => dim,
            None if hidden_size % num_q_heads == 0 => hidden_size / num_q_heads,
            None => {
                return Err(config_error(
                    "head_dim",
                    format!(
                        "missing, and hidden_size {hidden_size} is not a multiple of {num_q_heads} heads"
                    ),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(config_error(
                "head_dim",
                format!("RoPE needs an even head_dim, found {head_dim}"),
            ));
        }

        // transformers 5 moved RoPE settings into `rope_parameters`; transformers 4 has `rope_theta` and
        // `rope_scaling` at the top level.
        let rope_parameters = object.get("rope_parameters").filter(|v| !v.is_null());
        let rope_theta = match rope_parameters {
            Some(parameters) => {
                optional_f64("rope_parameters.rope_theta", parameters.get("rope_theta"))?
            }
            None => None,
        }
        .or(optional_f64("rope_theta", object.get("rope_theta"))?)
        .unwrap_or(10_000.0);
        let rope_scaling = rope_parameters.or(object.get("rope_scaling").filter(|v| !v.is_null()));
        if let Some(scaling) = rope_scaling {
            let rope_type = scaling
                .get("rope_type")
                .or(scaling.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if rope_type != "default" {
                return Err(config_error(
                    "rope_scaling",
                    format!("RoPE type {rope_type:?} is not supported (only \"default\")"),
                ));
            }
        }
        if object.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(config_error(
                "attention_bias",
                "attention biases are not supported".into(),
            ));
        }
        if object.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(config_error(
                "use_sliding_window",
                "sliding-window attention is not supported".into(),
            ));
        }
        if let Some(act) = object.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(config_error(
                "hidden_act",
                format!("expected \"silu\", found {act:?}"),
            ));
        }

        let rms_norm_eps =
            optional_f64("rms_norm_eps", object.get("rms_norm_eps"))?.unwrap_or(1e-6) as f32;
        let tie_word_embeddings = match object.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(tied)) => *tied,
            Some(other) => {
                return Err(config_error(
                    "tie_word_embeddings",
                    format!("expected a boolean, found {other}"),
                ));
            }
        };
        Ok(Self {
            vocab_size: required_usize("vocab_size")?,
            hidden_size,
            intermediate_size: required_usize("intermediate_size")?,
            num_layers: required_usize("num_hidden_layers")?,
            num_q_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            max_position_embeddings: optional_usize("max_position_embeddings")?.unwrap_or(32_768),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": true
        })
    }

    #[test]
    fn both_rope_layouts_parse_to_the_same_theta() {
        let mut t4 = base();
        t4["rope_theta"] = json!(1_000_000.0);
        t4["rope_scaling"] = Value::Null;
        t4["torch_dtype"] = json!("bfloat16");
        let mut t5 = base();
        t5["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1_000_000.0});
        t5["dtype"] = json!("bfloat16");
        let a = ModelConfig::from_json(Path::new("t4.json"), &t4).unwrap();
        let b = ModelConfig::from_json(Path::new("t5.json"), &t5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 1_000_000.0);
        assert_eq!(a.head_dim, 32);
        assert_eq!(a.q_dim(), 128);
        assert!(a.tie_word_embeddings);
    }

    #[test]
    fn head_dim_defaults_to_hidden_over_heads() {
        let mut doc = base();
        doc.as_object_mut().unwrap().remove("head_dim");
        let config = ModelConfig::from_json(Path::new("c.json"), &doc).unwrap();
        assert_eq!(config.head_dim, 16);
        assert_eq!(config.rope_theta, 10_000.0);
    }

    #[test]
    fn other_architectures_and_bad_fields_are_named() {
        let mut llama = base();
        llama["model_type"] = json!("llama");
        llama["architectures"] = json!(["LlamaForCausalLM"]);
        let error = ModelConfig::from_json(Path::new("l.json"), &llama)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not a Qwen3 checkpoint") && error.contains("llama"),
            "{error}"
        );

        let mut bad = base();
        bad["num_key_value_heads"] = json!(3);
        let error = ModelConfig::from_json(Path::new("b.json"), &bad)
            .unwrap_err()
            .to_string();
        assert!(error.contains("num_key_value_heads"), "{error}");

        let mut yarn = base();
        yarn["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let error = ModelConfig::from_json(Path::new("y.json"), &yarn)
            .unwrap_err()
            .to_string();
        assert!(error.contains("yarn"), "{error}");

        let mut missing = base();
        missing.as_object_mut().unwrap().remove("vocab_size");
        let error = ModelConfig::from_json(Path::new("m.json"), &missing)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("vocab_size") && error.contains("missing"),
            "{error}"
        );
    }
}
