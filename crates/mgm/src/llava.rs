//! LLaVA as transformers' `LlavaForConditionalGeneration`: a CLIP vision tower, the
//! `multi_modal_projector` (`linear_1`, activation, `linear_2`) and a causal LM; the projected
//! image features replace the embeddings of the image tokens in order.
//!
//! Checkpoints in llava-hf's layout, which transformers 5.23's `save_pretrained` writes too:
//! `vision_tower.*` (a `CLIPVisionModel`, with or without `vision_model.`),
//! `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
//! `language_model.lm_head.weight`. From config.json: `vision_config`, `text_config`,
//! `image_token_id` (or 4.x's `image_token_index`), `vision_feature_layer` (an index into the
//! tower's hidden states, or a list of them concatenated on channels),
//! `vision_feature_select_strategy` (`default` drops the class token, `full` keeps it),
//! `projector_hidden_act`, `multimodal_projector_bias`.

use std::path::Path;

use mgm_fusion::Projector;
use mgm_llm::{CausalLm, DecoderConfig, Positions, QuantFormat};
use mgm_tensor::nn::Activation;
use mgm_tensor::{DType, Tensor};
use mgm_vision::clip::{ClipVisionConfig, ClipVisionModel};
use serde_json::Value;

use crate::{Error, Result};

/// The multimodal keys of a LLaVA config.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    /// The id whose positions take image features.
    pub image_token_id: u32,
    /// Hidden-state indices of the tower whose outputs are the image features (several are
    /// concatenated on channels).
    pub feature_layers: Vec<isize>,
    /// `full`: keep the class token (`default` drops it).
    pub keep_cls: bool,
    /// The projector's activation.
    pub projector_act: Activation,
    /// Whether the projector's layers have biases.
    pub projector_bias: bool,
}

impl LlavaConfig {
    fn from_json(v: &Value, path: &str) -> Result<LlavaConfig> {
        let err = |msg: String| Error::Config {
            path: path.to_string(),
            msg,
        };
        let image_token_id = v
            .get("image_token_id")
            .or_else(|| v.get("image_token_index"))
            .and_then(Value::as_u64)
            .ok_or_else(|| err("missing required key \"image_token_id\"".into()))?
            as u32;
        let feature_layers = match v.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Number(n)) => vec![
                n.as_i64()
                    .ok_or_else(|| err(format!("vision_feature_layer {n} is not an integer")))?
                    as isize,
            ],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| {
                    x.as_i64().map(|i| i as isize).ok_or_else(|| {
                        err(format!("vision_feature_layer entry {x} is not an integer"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(err(format!(
                    "vision_feature_layer {other} is neither an integer nor a list of them"
                )));
            }
        };
        let keep_cls = match v["vision_feature_select_strategy"]
            .as_str()
            .unwrap_or("default")
        {
            "default" => false,
            "full" => true,
            other => {
                return Err(err(format!(
                    "vision_feature_select_strategy {other:?} (expected \"default\" or \"full\")"
                )));
            }
        };
        let act = v["projector_hidden_act"].as_str().unwrap_or("gelu");
        let projector_act = Activation::from_hf_name(act)
            .ok_or_else(|| err(format!("projector_hidden_act {act:?} is not supported")))?;
        let projector_bias = v["multimodal_projector_bias"].as_bool().unwrap_or(true);
        Ok(LlavaConfig {
            image_token_id,
            feature_layers,
            keep_cls,
            projector_act,
            projector_bias,
        })
    }
}

/// A loaded LLaVA model.
pub struct Llava {
    vision: ClipVisionModel,
    projector: Projector,
    lm: CausalLm,
    config: LlavaConfig,
}

impl Llava {
    /// Loads `dir/config.json` and `model.safetensors` (or a sharded index); `quant`
    /// quantizes the language model's projections (the tower and projector stay f32).
    pub fn from_dir(dir: &Path, quant: Option<QuantFormat>) -> Result<Llava> {
        let cfg_path = dir.join("config.json");
        let (v, path) = crate::forward::read_config(&cfg_path)?;
        let config = LlavaConfig::from_json(&v, &path)?;
        let vision_cfg = ClipVisionConfig::from_file(&cfg_path)?;
        let text_cfg = match v.get("text_config") {
            Some(t) if t.is_object() => {
                DecoderConfig::from_json_str(&t.to_string(), &format!("{path}: text_config"))?
            }
            _ => {
                return Err(Error::Config {
                    path,
                    msg: "missing required key \"text_config\"".into(),
                });
            }
        };
        let vs = crate::forward::weights(dir)?.with_dtype(DType::F32);
        let vision = ClipVisionModel::load(&vs.pp("vision_tower"), &vision_cfg)?;
        let in_dim = vision_cfg.hidden_size * config.feature_layers.len();
        let projector = Projector::load_named(
            &vs.pp("multi_modal_projector"),
            ["linear_1", "linear_2"],
            config.projector_act,
            config.projector_bias,
            [in_dim, text_cfg.hidden_size, text_cfg.hidden_size],
        )?;
        let lm = CausalLm::load(&vs.pp("language_model"), &text_cfg)?;
        vs.finish_ignoring(|n| n.ends_with("position_ids") || n.ends_with("rotary_emb.inv_freq"))?;
        let lm = match quant {
            Some(f) => lm.quantize(f)?,
            None => lm,
        };
        Ok(Llava {
            vision,
            projector,
            lm,
            config,
        })
    }

    /// The multimodal configuration.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// The language model.
    pub fn language_model(&self) -> &CausalLm {
        &self.lm
    }

    /// The vision tower.
    pub fn vision_tower(&self) -> &ClipVisionModel {
        &self.vision
    }

    /// Image tokens per image: the tower's patches, plus the class token under `full`.
    pub fn tokens_per_image(&self) -> usize {
        let g = self.vision.config().grid();
        g * g + usize::from(self.config.keep_cls)
    }

    /// The projected features of `pixel_values` `[N, 3, H, W]`: `[N, tokens, hidden]`, as
    /// transformers' `get_image_features`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let layers = &self.config.feature_layers;
        let feats: Vec<Tensor> = if layers.len() == 1 {
            vec![
                self.vision
                    .feature(pixel_values, layers[0], self.config.keep_cls)?,
            ]
        } else {
            let out = self.vision.forward_with(
                pixel_values,
                mgm_vision::ClipForwardOptions {
                    output_hidden_states: true,
                    ..Default::default()
                },
            )?;
            let n = out.hidden_states.len() as isize;
            layers
                .iter()
                .map(|&l| {
                    let i = if l < 0 { n + l } else { l };
                    let h = out
                        .hidden_states
                        .get(usize::try_from(i).unwrap_or(usize::MAX))
                        .ok_or_else(|| Error::Config {
                            path: "config.json".into(),
                            msg: format!(
                                "vision_feature_layer {l} is out of range for {n} hidden states"
                            ),
                        })?;
                    let len = h.shape()[1];
                    Ok(if self.config.keep_cls {
                        h.clone()
                    } else {
                        h.narrow(1, 1, len - 1)?
                    })
                })
                .collect::<Result<_>>()?
        };
        let x = if feats.len() == 1 {
            feats.into_iter().next().expect("one feature map")
        } else {
            Tensor::cat(&feats, -1)?
        };
        Ok(self.projector.forward(&x.to_dtype(DType::F32)?)?)
    }

    /// The input embeddings of `input_ids` `[B, T]` with the image tokens' rows replaced, in
    /// order, by the features of `pixel_values` (`[N, 3, H, W]`; `None` when there are no image
    /// tokens). The image tokens must number exactly `N * tokens_per_image`.
    pub fn embed(&self, input_ids: &Tensor, pixel_values: Option<&Tensor>) -> Result<Tensor> {
        let input_err = |msg: String| Error::Input {
            name: "input_ids".into(),
            msg,
        };
        if input_ids.dtype() != DType::I64 || input_ids.rank() != 2 {
            return Err(input_err(format!(
                "{:?} {:?}, expected i64 [batch, seq]",
                input_ids.dtype(),
                input_ids.shape()
            )));
        }
        let image = i64::from(self.config.image_token_id);
        let mut ids = input_ids.to_vec::<i64>()?;
        let slots: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == image).collect();
        // the image token may lie outside the text vocabulary: its rows are replaced anyway
        for &i in &slots {
            ids[i] = 0;
        }
        let embeds = self.lm.embed(&Tensor::from_vec(ids, input_ids.shape())?)?;
        let feats = match pixel_values {
            Some(p) => Some(self.image_features(p)?),
            None => None,
        };
        let n_feat = feats.as_ref().map_or(0, |f| f.shape()[0] * f.shape()[1]);
        if slots.len() != n_feat {
            return Err(input_err(format!(
                "{} image tokens (id {image}) for {n_feat} image features ({} images of {} \
                 tokens)",
                slots.len(),
                feats.as_ref().map_or(0, |f| f.shape()[0]),
                self.tokens_per_image()
            )));
        }
        let Some(feats) = feats else {
            return Ok(embeds);
        };
        let h = embeds.shape()[2];
        let (b, t) = (input_ids.shape()[0], input_ids.shape()[1]);
        let flat = embeds.reshape(&[b * t, h])?;
        let idx = Tensor::from_vec(
            slots.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            &[slots.len()],
        )?;
        // zero the image rows, then add the features there
        let mut keep = vec![1f32; b * t];
        for &i in &slots {
            keep[i] = 0.0;
        }
        let kept = flat.mul(&Tensor::from_vec(keep, &[b * t, 1])?)?;
        let spliced = kept.index_add(0, &idx, &feats.reshape(&[n_feat, h])?)?;
        Ok(spliced.reshape(&[b, t, h])?)
    }

    /// The logits `[B, T, V]` of `input_ids` with `pixel_values`, as
    /// `model(input_ids=..., pixel_values=...)`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        pos: Option<&Positions>,
    ) -> Result<Tensor> {
        let x = self.embed(input_ids, pixel_values)?;
        Ok(self.lm.forward_embeds(&x, pos)?)
    }
}

/// The `<image>` marker of LLaVA and MGM prompts.
pub const IMAGE_MARKER: &str = "<image>";

/// Token ids of `prompt` for `n_images` images: each `<image>` marker becomes
/// `tokens_per_image` copies of `image_token` (LLaVA: its image token once per feature; MGM: -200
/// once per image), the text between markers is encoded chunk by chunk (only the first chunk
/// gets the tokenizer's special tokens, i.e. BOS, and only when `add_special`: a rendered chat
/// template holds its own), as LLaVA's and MGM's `tokenizer_image_token` do. A prompt without
/// markers must be given them first ([`with_markers`]); a count that differs from `n_images`
/// is an error. Returns the ids and the text tokens alone (for the repetition penalty).
pub fn prompt_ids(
    tok: &mgm_llm::Tokenizer,
    prompt: &str,
    n_images: usize,
    tokens_per_image: usize,
    image_token: i64,
    add_special: bool,
) -> Result<(Vec<i64>, Vec<u32>)> {
    let markers = prompt.matches(IMAGE_MARKER).count();
    if markers != n_images {
        return Err(Error::Input {
            name: "prompt".into(),
            msg: format!(
                "{markers} {IMAGE_MARKER} marker(s) for {n_images} image(s): give one --image per \
                 marker"
            ),
        });
    }
    let (mut ids, mut text) = (Vec::new(), Vec::new());
    for (i, chunk) in prompt.split(IMAGE_MARKER).enumerate() {
        if i > 0 {
            ids.extend(std::iter::repeat_n(image_token, tokens_per_image));
        }
        if chunk.is_empty() && i > 0 {
            continue;
        }
        let t = tok.encode(chunk, add_special && i == 0)?;
        ids.extend(t.iter().map(|&x| i64::from(x)));
        text.extend(t);
    }
    Ok((ids, text))
}

/// `prompt` as the user gave it when it holds `<image>` markers; otherwise the images go in
/// front as MGM's CLI puts them: `<image>\n` for one, `Image 1:<image>\nImage 2:<image>\n...`
/// for several.
pub fn with_markers(prompt: &str, n_images: usize) -> String {
    if n_images == 0 || prompt.contains(IMAGE_MARKER) {
        return prompt.to_string();
    }
    let front: String = if n_images == 1 {
        format!("{IMAGE_MARKER}\n")
    } else {
        (1..=n_images)
            .map(|k| format!("Image {k}:{IMAGE_MARKER}\n"))
            .collect()
    };
    format!("{front}{prompt}")
}

/// MGM's conversation templates (DESIGN.md section 1) around one user turn `q` (which holds
/// the `<image>` markers): `vicuna_v1`, `gemma`, and `llama_3` (Llama-3 Instruct's turn format
/// with MGM's system turn, as its `conv_llama_3` renders one question: system, user, then the
/// open assistant header). BOS is not part of them: the tokenizer adds it to the first chunk.
pub fn conversation(template: &str, q: &str) -> Result<String> {
    Ok(match template {
        "vicuna_v1" => format!(
            "A chat between a curious user and an artificial intelligence assistant. The \
             assistant gives helpful, detailed, and polite answers to the user's questions. \
             USER: {q} ASSISTANT:"
        ),
        "gemma" => format!("<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"),
        "llama_3" => format!(
            "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and \
             vision assistant. You are able to understand the visual content that the user \
             provides, and assist the user with a variety of tasks using natural \
             language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        other => {
            return Err(Error::Input {
                name: "--template".into(),
                msg: format!("{other:?} is not a template (vicuna_v1, gemma, llama_3)"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::conversation;

    /// MGM's `get_prompt` for one question: `system + sep`, then `role + message + sep` per
    /// answered turn and the bare role for the open one; composed here from conv_llama_3's
    /// fields rather than from the rendered string.
    #[test]
    fn llama_3_renders_mgm_conv_llama_3() {
        let header = |r: &str| format!("<|start_header_id|>{r}<|end_header_id|>\n\n");
        let sep = "<|eot_id|>";
        let system = format!(
            "{}You are a helpful language and vision assistant. You are able to understand the \
             visual content that the user provides, and assist the user with a variety of tasks \
             using natural language.",
            header("system")
        );
        let q = "<image>\nWhat is this?";
        let want = format!(
            "{system}{sep}{}{q}{sep}{}",
            header("user"),
            header("assistant")
        );
        assert_eq!(conversation("llama_3", q).unwrap(), want);
    }
}
