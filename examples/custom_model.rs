//! A model kind of your own, served by ml-worker: a program built on the
//! library that adds `kind: zscore` and runs the whole `ml-worker` command
//! line with it (`run`, `predict`, `models`, `demo`, ...).
//!
//! The model is a hand-written alpha: each feature is z-scored with the
//! mean and standard deviation in its file, clipped to `±clip` (the entry's
//! `zscore:` options block), weighted and summed. A missing feature
//! contributes nothing (its z-score is 0), so the model takes NaN and the
//! registry's default missing-value policy for it is `nan`.
//!
//! ```text
//! cargo run --example custom_model -- predict --model alpha \
//!     --registry examples/custom_model/models.yaml \
//!     --input examples/custom_model/rows_with_gaps.jsonl
//! cargo run --example custom_model -- demo --config examples/custom_model/worker.yaml \
//!     --samples examples/custom_model/samples --events 2000
//! cargo run --example custom_model -- run --config examples/custom_model/worker.yaml
//! ```
//!
//! Everything around the model is the registry's, as for the built-in
//! kinds: the file is read within `limits.max_model_mb`, its SHA256 checked
//! against a pin and audited, the load runs under `load_timeout_ms`, each
//! batch under `inference_timeout_ms`, and the answer's shape is checked.

use ml_worker::model::{
    Batch, EntryHead, ImportanceType, KindOptions, LoadContext, Loaded, Model, ModelError,
    ModelLoader, OptionsBlock, Output, Prediction, TaskType,
};
use ml_worker::registry::RegistryBuilder;
use serde::Deserialize;

/// The model file (`alpha.json`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZScoreFile {
    format: String,
    features: Vec<String>,
    mean: Vec<f64>,
    std: Vec<f64>,
    weights: Vec<f64>,
    bias: f64,
}

/// The entry's `zscore:` block.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZScoreOptions {
    /// Largest |z-score| a feature contributes with.
    #[serde(default = "default_clip")]
    clip: f64,
}

fn default_clip() -> f64 {
    f64::INFINITY
}

struct ZScore {
    mean: Vec<f64>,
    std: Vec<f64>,
    weights: Vec<f64>,
    bias: f64,
    clip: f64,
}

impl Model for ZScore {
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        batch.expect_features(self.weights.len())?;
        let values = (0..batch.n_rows())
            .map(|r| {
                let mut acc = self.bias;
                for (j, &x) in batch.row(r).iter().enumerate() {
                    if x.is_nan() {
                        continue; // missing: z-score 0
                    }
                    let z = ((x - self.mean[j]) / self.std[j]).clamp(-self.clip, self.clip);
                    acc += self.weights[j] * z;
                }
                acc
            })
            .collect();
        Ok(Prediction {
            values: Output { values, width: 1 },
            probabilities: None,
        })
    }

    /// |weight| as the "gain"; there are no splits to count.
    fn feature_importance(&self, kind: ImportanceType) -> Option<Vec<f64>> {
        (kind == ImportanceType::Gain).then(|| self.weights.iter().map(|w| w.abs()).collect())
    }
}

/// `kind: zscore`.
struct ZScoreLoader;

impl ModelLoader for ZScoreLoader {
    fn kind(&self) -> &str {
        "zscore"
    }

    fn parse_options(
        &self,
        block: Option<&OptionsBlock>,
        entry: &EntryHead<'_>,
    ) -> Result<KindOptions, String> {
        if entry.task_type != TaskType::Regression {
            return Err("a zscore model is a regression model (task_type: regression)".into());
        }
        let options = match block {
            Some(b) => b.parse::<ZScoreOptions>()?,
            None => ZScoreOptions {
                clip: default_clip(),
            },
        };
        if options.clip.is_nan() || options.clip <= 0.0 {
            return Err(format!("clip {} must be positive", options.clip));
        }
        Ok(KindOptions::new(options))
    }

    fn load(&self, bytes: &[u8], ctx: &LoadContext<'_>) -> Result<Loaded, ModelError> {
        let bad = |reason: String| ctx.format_error("zscore", reason);
        let file: ZScoreFile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if file.format != "zscore-alpha/1" {
            return Err(bad(format!(
                "format '{}' is not zscore-alpha/1",
                file.format
            )));
        }
        let n = file.features.len();
        if [file.mean.len(), file.std.len(), file.weights.len()] != [n; 3] {
            return Err(bad(format!(
                "{n} features but {} means, {} standard deviations and {} weights",
                file.mean.len(),
                file.std.len(),
                file.weights.len()
            )));
        }
        if file.features != ctx.features {
            return Err(ModelError::Input(format!(
                "field 'features' is {:?} but the model file's are {:?}",
                ctx.features, file.features
            )));
        }
        let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
        if !(finite(&file.mean) && finite(&file.weights) && file.bias.is_finite())
            || file.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(bad(
                "every mean, weight and the bias must be finite, every std positive".into(),
            ));
        }
        let clip = ctx
            .options::<ZScoreOptions>()
            .map_or(f64::INFINITY, |o| o.clip);
        Ok(Loaded {
            detail: format!("z-score alpha, {n} features, clip {clip}"),
            n_outputs: 1,
            n_classes: None,
            // a missing feature contributes nothing: the model takes NaN
            handles_missing: true,
            model: std::sync::Arc::new(ZScore {
                mean: file.mean,
                std: file.std,
                weights: file.weights,
                bias: file.bias,
                clip,
            }),
        })
    }
}

fn main() {
    ml_worker::cli::main(RegistryBuilder::new().with_loader(ZScoreLoader))
}
