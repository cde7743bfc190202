//! Trading signals from predictions, by each model's `signal` rule in
//! `models.yaml`.
//!
//! - Regression (`buy_above`, `sell_below`): BUY when the prediction is above
//!   `buy_above`, SELL when below `sell_below`, else HOLD; strength is the
//!   margin beyond the crossed threshold (0 for HOLD).
//! - Classification (`classes`, `min_probability`): the predicted class maps
//!   to a side (unmapped classes HOLD); a class whose probability is below
//!   `min_probability` gives HOLD; strength is that class's probability
//!   (0 when HOLD for lack of confidence).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::events::Side;

/// A model's signal rule, as written under `signal:` in `models.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawSignalRule")]
pub enum SignalRule {
    /// For regression models.
    Threshold {
        /// BUY when the prediction is strictly above this.
        buy_above: f64,
        /// SELL when the prediction is strictly below this.
        sell_below: f64,
    },
    /// For classification models.
    Classes {
        /// Class index to side; classes not listed give HOLD.
        classes: BTreeMap<usize, Side>,
        /// The predicted class's probability must reach this (0 to 1).
        min_probability: f64,
    },
}

/// `signal:` as written; exactly one of the two shapes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignalRule {
    buy_above: Option<f64>,
    sell_below: Option<f64>,
    classes: Option<BTreeMap<usize, Side>>,
    min_probability: Option<f64>,
}

impl TryFrom<RawSignalRule> for SignalRule {
    type Error = String;
    fn try_from(r: RawSignalRule) -> Result<Self, String> {
        match r {
            RawSignalRule {
                buy_above: Some(buy_above),
                sell_below: Some(sell_below),
                classes: None,
                min_probability: None,
            } => Ok(SignalRule::Threshold { buy_above, sell_below }),
            RawSignalRule {
                buy_above: None,
                sell_below: None,
                classes: Some(classes),
                min_probability,
            } => Ok(SignalRule::Classes {
                classes,
                min_probability: min_probability.unwrap_or(0.0),
            }),
            _ => Err("give either 'buy_above' and 'sell_below' (regression) or 'classes' with an optional \
                 'min_probability' (classification)"
                .into()),
        }
    }
}

impl SignalRule {
    /// Checks the rule's own values; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SignalRule::Threshold {
                buy_above,
                sell_below,
            } => {
                if !buy_above.is_finite() || !sell_below.is_finite() {
                    return Err("buy_above and sell_below must be finite numbers".into());
                }
                if buy_above < sell_below {
                    return Err(format!(
                        "buy_above ({buy_above}) is below sell_below ({sell_below})"
                    ));
                }
            }
            SignalRule::Classes {
                classes,
                min_probability,
            } => {
                if !(0.0..=1.0).contains(min_probability) {
                    return Err(format!(
                        "min_probability {min_probability} is not within 0..=1"
                    ));
                }
                if classes.is_empty() {
                    return Err("classes maps no class to a side".into());
                }
            }
        }
        Ok(())
    }

    /// The highest class index the rule names (checked against the model).
    pub fn max_class(&self) -> Option<usize> {
        match self {
            SignalRule::Classes { classes, .. } => classes.keys().next_back().copied(),
            SignalRule::Threshold { .. } => None,
        }
    }

    /// Side and strength for one prediction. `probabilities` are the row's
    /// class probabilities (classifiers only); a NaN prediction gives HOLD.
    pub fn apply(&self, prediction: f64, probabilities: Option<&[f64]>) -> (Side, f64) {
        match self {
            SignalRule::Threshold {
                buy_above,
                sell_below,
            } => {
                if prediction > *buy_above {
                    (Side::Buy, prediction - buy_above)
                } else if prediction < *sell_below {
                    (Side::Sell, sell_below - prediction)
                } else {
                    (Side::Hold, 0.0)
                }
            }
            SignalRule::Classes {
                classes,
                min_probability,
            } => {
                if prediction.is_nan() || prediction < 0.0 {
                    return (Side::Hold, 0.0);
                }
                let class = prediction as usize;
                let p = probabilities
                    .and_then(|p| p.get(class))
                    .copied()
                    .unwrap_or(f64::NAN);
                if p.is_nan() || p < *min_probability {
                    return (Side::Hold, 0.0);
                }
                (classes.get(&class).copied().unwrap_or(Side::Hold), p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> SignalRule {
        let r: SignalRule = serde_norway::from_str(yaml).unwrap();
        r.validate().unwrap();
        r
    }

    #[test]
    fn regression_thresholds() {
        let r = rule("{buy_above: 0.5, sell_below: -0.5}");
        assert_eq!(r.apply(0.75, None), (Side::Buy, 0.25));
        assert_eq!(r.apply(-1.0, None), (Side::Sell, 0.5));
        assert_eq!(r.apply(0.5, None), (Side::Hold, 0.0));
        assert_eq!(r.apply(f64::NAN, None), (Side::Hold, 0.0));
    }

    #[test]
    fn classification_classes_and_confidence() {
        let r = rule("{classes: {2: BUY, 0: SELL}, min_probability: 0.6}");
        assert_eq!(r.apply(2.0, Some(&[0.1, 0.2, 0.7])), (Side::Buy, 0.7));
        assert_eq!(r.apply(0.0, Some(&[0.9, 0.05, 0.05])), (Side::Sell, 0.9));
        assert_eq!(r.apply(2.0, Some(&[0.3, 0.2, 0.5])), (Side::Hold, 0.0));
        assert_eq!(r.apply(1.0, Some(&[0.1, 0.8, 0.1])), (Side::Hold, 0.8));
        assert_eq!(r.max_class(), Some(2));
    }

    #[test]
    fn bad_rules_are_named() {
        let parse = |y: &str| {
            serde_norway::from_str::<SignalRule>(y)
                .map_err(|e| e.to_string())
                .and_then(|r| r.validate().map(|_| r))
        };
        assert!(parse("{buy_above: -1, sell_below: 1}")
            .unwrap_err()
            .contains("below sell_below"));
        assert!(parse("{classes: {0: BUY}, min_probability: 2}")
            .unwrap_err()
            .contains("min_probability"));
        assert!(parse("{classes: {0: UP}}").is_err());
        assert!(parse("{buy_above: 1}").unwrap_err().contains("give either"));
        assert!(parse("{buy_above: 1, sell_below: 0, classes: {0: BUY}}")
            .unwrap_err()
            .contains("give either"));
        assert!(parse("{buy_above: 1, sell_below: 0, colour: 2}")
            .unwrap_err()
            .contains("colour"));
    }
}
