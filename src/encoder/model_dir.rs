//! Hugging Face model directories: what synthrank reads (config, weights, tokenizer,
//! sentence-transformers pooling) and the directory it writes after training, which
//! transformers and sentence-transformers load as they load any other checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{Value, json};

use super::config::BertConfig;
use super::{Bert, EncoderError, Pooling, TextTokenizer};

/// Tokenizer and metadata files copied verbatim into a saved model directory.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// A model directory on disk and what it says about how to embed.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    pub config: BertConfig,
    /// config.json as found, so saving keeps fields synthrank does not interpret.
    raw_config: Value,
    /// From sentence-transformers' `1_Pooling/config.json`, else mean.
    pub pooling: Pooling,
    /// Whether sentence-transformers' modules.json ends in a Normalize module.
    pub normalize: bool,
    /// sentence-transformers' max_seq_length, if set.
    pub max_seq_length: Option<usize>,
}

fn read_json(path: &Path) -> Result<Value, EncoderError> {
    let text = std::fs::read_to_string(path).map_err(|e| EncoderError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EncoderError::Config {
        file: path.display().to_string(),
        message: e.to_string(),
    })
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<ModelDir, EncoderError> {
        if !path.is_dir() {
            return Err(EncoderError::NotAModelDir {
                path: path.display().to_string(),
                reason: "not a directory".into(),
            });
        }
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(EncoderError::NotAModelDir {
                path: path.display().to_string(),
                reason: "no config.json".into(),
            });
        }
        let raw_config = read_json(&config_path)?;
        let config: BertConfig =
            serde_json::from_value(raw_config.clone()).map_err(|e| EncoderError::Config {
                file: config_path.display().to_string(),
                message: e.to_string(),
            })?;
        config.validate().map_err(|message| EncoderError::Config {
            file: config_path.display().to_string(),
            message,
        })?;
        let (mut pooling, mut normalize) = (Pooling::Mean, false);
        let modules_path = path.join("modules.json");
        if modules_path.is_file() {
            let modules = read_json(&modules_path)?;
            for module in modules.as_array().into_iter().flatten() {
                let kind = module["type"].as_str().unwrap_or_default();
                let dir = path.join(module["path"].as_str().unwrap_or_default());
                if kind.ends_with("Normalize") {
                    normalize = true;
                } else if kind.ends_with("Pooling") && dir.join("config.json").is_file() {
                    let p = read_json(&dir.join("config.json"))?;
                    if p["pooling_mode_cls_token"].as_bool() == Some(true) {
                        pooling = Pooling::Cls;
                    } else if p["pooling_mode_mean_tokens"].as_bool() != Some(true) {
                        return Err(EncoderError::Config {
                            file: dir.join("config.json").display().to_string(),
                            message: "only mean and cls pooling are supported".into(),
                        });
                    }
                }
            }
        }
        let st_path = path.join("sentence_bert_config.json");
        let max_seq_length = if st_path.is_file() {
            read_json(&st_path)?["max_seq_length"]
                .as_u64()
                .map(|v| v as usize)
        } else {
            None
        };
        Ok(ModelDir {
            path: path.to_path_buf(),
            config,
            raw_config,
            pooling,
            normalize,
            max_seq_length,
        })
    }

    /// The files whose content defines this model, for stage fingerprints.
    pub fn files(&self) -> Vec<PathBuf> {
        [
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "modules.json",
            "1_Pooling/config.json",
            "sentence_bert_config.json",
        ]
        .iter()
        .map(|f| self.path.join(f))
        .filter(|p| p.is_file())
        .collect()
    }

    pub(crate) fn weights_path(&self) -> Result<PathBuf, EncoderError> {
        ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| self.path.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| EncoderError::NotAModelDir {
                path: self.path.display().to_string(),
                reason: "no model.safetensors or pytorch_model.bin".into(),
            })
    }

    pub(crate) fn load_tensors(
        &self,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, EncoderError> {
        let path = self.weights_path()?;
        let tensors = if path.extension().is_some_and(|e| e == "safetensors") {
            candle_core::safetensors::load(&path, device)?
        } else {
            candle_core::pickle::read_all(&path)?.into_iter().collect()
        };
        Ok(tensors)
    }

    pub fn load_model(&self, device: &Device) -> Result<Bert, EncoderError> {
        let source = self.weights_path()?.display().to_string();
        Bert::from_tensors(
            self.config.clone(),
            self.load_tensors(device)?,
            &source,
            device,
        )
    }

    pub fn tokenizer(&self) -> Result<TextTokenizer, EncoderError> {
        TextTokenizer::from_file(&self.path.join("tokenizer.json"))
    }

    /// Writes `model` as a complete model directory at `dest` (replacing it atomically): weights,
    /// this directory's config and tokenizer files, and sentence-transformers module configs
    /// with the given pooling.
    pub(crate) fn save(
        &self,
        model: &Bert,
        dest: &Path,
        pooling: Pooling,
        normalize: bool,
        max_seq_length: usize,
    ) -> Result<(), EncoderError> {
        let staging = dest.with_extension("saving");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| EncoderError::io(&staging, e))?;
        }
        std::fs::create_dir_all(staging.join("1_Pooling"))
            .map_err(|e| EncoderError::io(&staging, e))?;
        let tensors: HashMap<String, Tensor> = model.state().into_iter().collect();
        candle_core::safetensors::save(&tensors, staging.join("model.safetensors"))?;
        for file in TOKENIZER_FILES {
            let src = self.path.join(file);
            if src.is_file() {
                std::fs::copy(&src, staging.join(file)).map_err(|e| EncoderError::io(&src, e))?;
            }
        }
        let mut modules = vec![
            json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
            json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
        ];
        if normalize {
            std::fs::create_dir_all(staging.join("2_Normalize"))
                .map_err(|e| EncoderError::io(&staging, e))?;
            modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        }
        let files: [(&str, Value); 4] = [
            ("config.json", self.raw_config.clone()),
            ("modules.json", Value::Array(modules)),
            (
                "1_Pooling/config.json",
                json!({
                    "word_embedding_dimension": self.config.hidden_size,
                    "pooling_mode_cls_token": pooling == Pooling::Cls,
                    "pooling_mode_mean_tokens": pooling == Pooling::Mean,
                    "pooling_mode_max_tokens": false,
                    "pooling_mode_mean_sqrt_len_tokens": false,
                }),
            ),
            (
                "sentence_bert_config.json",
                json!({"max_seq_length": max_seq_length, "do_lower_case": false}),
            ),
        ];
        for (name, value) in files {
            let path = staging.join(name);
            let text = serde_json::to_string_pretty(&value).expect("json values serialize");
            std::fs::write(&path, text).map_err(|e| EncoderError::io(&path, e))?;
        }
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(|e| EncoderError::io(dest, e))?;
        }
        std::fs::rename(&staging, dest).map_err(|e| EncoderError::io(dest, e))
    }
}
