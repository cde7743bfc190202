//! Linear models (`X @ coef.T + intercept`) and the feature scalers that
//! precede them in scikit-learn pipelines, in `f64`.
//!
//! Links: identity (regression), logistic (binary: `[1-p, p]` with
//! `p = 1/(1+exp(-z))`), softmax (multinomial, max-subtracted as
//! scipy.special.softmax).

use super::{Batch, Model, ModelError, Output, Prediction};

/// How raw scores become outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    Identity,
    /// One score per row, P(class 1).
    Logistic,
    Softmax,
}

/// `n_outputs` rows of `n_features` coefficients plus intercepts.
#[derive(Debug, Clone)]
pub struct Linear {
    pub n_features: usize,
    /// Row-major `[n_outputs, n_features]`.
    pub coef: Vec<f64>,
    pub intercept: Vec<f64>,
    pub link: Link,
}

impl Linear {
    pub fn n_outputs(&self) -> usize {
        self.intercept.len()
    }

    /// Raw scores `[n_rows, n_outputs]`.
    pub fn decision(&self, data: &[f64], n_rows: usize) -> Vec<f64> {
        let k = self.n_outputs();
        let mut out = Vec::with_capacity(n_rows * k);
        for row in data.chunks_exact(self.n_features).take(n_rows) {
            for (w, b) in self.coef.chunks_exact(self.n_features).zip(&self.intercept) {
                out.push(row.iter().zip(w).map(|(x, w)| x * w).sum::<f64>() + b);
            }
        }
        out
    }
}

/// A linear model served through the [`Model`] trait.
pub struct LinearModel {
    pub linear: Linear,
}

impl Model for LinearModel {
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        batch.expect_features(self.linear.n_features)?;
        let n = batch.n_rows();
        let k = self.linear.n_outputs();
        let mut z = self.linear.decision(batch.data(), n);
        match self.linear.link {
            Link::Identity => Ok(Prediction {
                values: Output {
                    values: z,
                    width: k,
                },
                probabilities: None,
            }),
            Link::Logistic => {
                let probs = Output {
                    values: z
                        .iter()
                        .flat_map(|z| {
                            let p = 1.0 / (1.0 + (-z).exp());
                            [1.0 - p, p]
                        })
                        .collect(),
                    width: 2,
                };
                Ok(Prediction {
                    values: probs.argmax(),
                    probabilities: Some(probs),
                })
            }
            Link::Softmax => {
                for row in z.chunks_mut(k.max(1)) {
                    softmax(row);
                }
                let probs = Output {
                    values: z,
                    width: k,
                };
                Ok(Prediction {
                    values: probs.argmax(),
                    probabilities: Some(probs),
                })
            }
        }
    }
}

/// In place, as scipy.special.softmax: `exp(x - max) / sum`.
pub fn softmax(row: &mut [f64]) {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// A fitted feature transform.
#[derive(Debug, Clone)]
pub enum Scaler {
    /// StandardScaler: `(x - mean) / scale` (either part optional).
    Standard {
        mean: Option<Vec<f64>>,
        scale: Option<Vec<f64>>,
    },
    /// MinMaxScaler: `x * scale + min`, then clipped to `clip` if set.
    MinMax {
        scale: Vec<f64>,
        min: Vec<f64>,
        clip: Option<(f64, f64)>,
    },
}

impl Scaler {
    pub fn n_features(&self) -> Option<usize> {
        match self {
            Scaler::Standard { mean, scale } => mean.as_ref().or(scale.as_ref()).map(Vec::len),
            Scaler::MinMax { scale, .. } => Some(scale.len()),
        }
    }

    /// Transforms row-major rows of `n` features in place.
    pub fn apply(&self, data: &mut [f64], n: usize) {
        for row in data.chunks_exact_mut(n) {
            match self {
                Scaler::Standard { mean, scale } => {
                    if let Some(m) = mean {
                        row.iter_mut().zip(m).for_each(|(x, m)| *x -= m);
                    }
                    if let Some(s) = scale {
                        row.iter_mut().zip(s).for_each(|(x, s)| *x /= s);
                    }
                }
                Scaler::MinMax { scale, min, clip } => {
                    for ((x, s), m) in row.iter_mut().zip(scale).zip(min) {
                        *x *= s;
                        *x += m;
                        if let Some((lo, hi)) = clip {
                            *x = x.clamp(*lo, *hi);
                        }
                    }
                }
            }
        }
    }
}
