//! [`ModelWeights`]: a Qwen3 model's tensors in f32 on the host, under their Hugging Face names, with the
//! projections that run together fused (q/k/v into one matrix, gate/up into one) so a step does one GEMM each.

use super::config::ModelConfig;

/// One decoder layer. Matrices are row-major `[out_features, in_features]`, as `nn.Linear` stores them.
pub(crate) struct LayerWeights {
    pub(crate) input_norm: Vec<f32>,
    /// Rows: q (`q_dim`), then k (`kv_dim`), then v (`kv_dim`); columns: `hidden_size`.
    pub(crate) qkv_proj: Vec<f32>,
    pub(crate) q_norm: Vec<f32>,
    pub(crate) k_norm: Vec<f32>,
    /// `[hidden_size, q_dim]`.
    pub(crate) o_proj: Vec<f32>,
    pub(crate) post_attention_norm: Vec<f32>,
    /// Rows: gate (`intermediate_size`), then up (`intermediate_size`); columns: `hidden_size`.
    pub(crate) gate_up_proj: Vec<f32>,
    /// `[hidden_size, intermediate_size]`.
    pub(crate) down_proj: Vec<f32>,
}

/// A whole Qwen3 causal LM in f32.
pub struct ModelWeights {
    pub(crate) config: ModelConfig,
    /// `[vocab_size, hidden_size]`.
    pub(crate) embed_tokens: Vec<f32>,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) final_norm: Vec<f32>,
    /// `[vocab_size, hidden_size]`; `None` when tied to `embed_tokens`.
    pub(crate) lm_head: Option<Vec<f32>>,
}

/// A tensor the model needs: its Hugging Face name and shape.
pub(crate) struct TensorSpec {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
}

impl ModelWeights {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub(crate) fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed_tokens)
    }

    /// The same model with every matrix (embedding, projections, lm_head) rounded to bf16 and back, norms
    /// kept: the weights a bf16 GPU backend computes with, so a CPU run on them isolates the differences of
    /// the computation itself.
    pub fn rounded_to_bf16(mut self) -> Self {
        let round = |values: &mut Vec<f32>| {
            for value in values.iter_mut() {
                *value = half::bf16::from_f32(*value).to_f32();
            }
        };
        round(&mut self.embed_tokens);
        if let Some(lm_head) = self.lm_head.as_mut() {
            round(lm_head);
        }
        for layer in &mut self.layers {
            for matrix in [
                &mut layer.qkv_proj,
                &mut layer.o_proj,
                &mut layer.gate_up_proj,
                &mut layer.down_proj,
            ] {
                round(matrix);
            }
        }
        self
    }

    /// Total f32 parameters held (a tied lm_head counted once).
    pub fn num_parameters(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.input_norm.len()
                    + l.qkv_proj.len()
                    + l.q_norm.len()
                    + l.k_norm.len()
                    + l.o_proj.len()
                    + l.post_attention_norm.len()
                    + l.gate_up_proj.len()
                    + l.down_proj.len()
            })
            .sum();
        self.embed_tokens.len()
            + layers
            + self.final_norm.len()
            + self.lm_head.as_ref().map_or(0, Vec::len)
    }

    /// Builds the model from a source of named tensors; `fetch` is asked for every tensor in
    /// Hugging Face naming with the shape it must have, and returns it flattened row-major.
    pub(crate) fn from_tensors<E>(
        config: ModelConfig,
        mut fetch: impl FnMut(&TensorSpec) -> Result<Vec<f32>, E>,
    ) -> Result<Self, E> {
        let h = config.hidden_size;
        let mut get = |name: String, shape: Vec<usize>| fetch(&TensorSpec { name, shape });
        let embed_tokens = get(
            "model.embed_tokens.weight".into(),
            vec![config.vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let input_norm = get(format!("{p}.input_layernorm.weight"), vec![h])?;
            let mut qkv_proj = get(
                format!("{p}.self_attn.q_proj.weight"),
                vec![config.q_dim(), h],
            )?;
            qkv_proj.extend(get(
                format!("{p}.self_attn.k_proj.weight"),
                vec![config.kv_dim(), h],
            )?);
            qkv_proj.extend(get(
                format!("{p}.self_attn.v_proj.weight"),
                vec![config.kv_dim(), h],
            )?);
            let q_norm = get(
                format!("{p}.self_attn.q_norm.weight"),
                vec![config.head_dim],
            )?;
            let k_norm = get(
                format!("{p}.self_attn.k_norm.weight"),
                vec![config.head_dim],
            )?;
            let o_proj = get(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, config.q_dim()],
            )?;
            let post_attention_norm = get(format!("{p}.post_attention_layernorm.weight"), vec![h])?;
            let mut gate_up_proj = get(
                format!("{p}.mlp.gate_proj.weight"),
                vec![config.intermediate_size, h],
            )?;
            gate_up_proj.extend(get(
                format!("{p}.mlp.up_proj.weight"),
                vec![config.intermediate_size, h],
            )?);
            let down_proj = get(
                format!("{p}.mlp.down_proj.weight"),
                vec![h, config.intermediate_size],
            )?;
            layers.push(LayerWeights {
                input_norm,
                qkv_proj,
                q_norm,
                k_norm,
                o_proj,
                post_attention_norm,
                gate_up_proj,
                down_proj,
            });
        }
        let final_norm = get("model.norm.weight".into(), vec![h])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight".into(), vec![config.vocab_size, h])?)
        };
        Ok(Self {
            config,
            embed_tokens,
            layers,
            final_norm,
            lm_head,
        })
    }
}
