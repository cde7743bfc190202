//! The model registry file (`config/models.yaml`): parsed raw with unknown
//! fields refused, then validated in one pass (no I/O) into [`ModelSpec`]s.
//! Every error names the file, the model and the field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::model::MissingPolicy;
use crate::model::{EntryHead, KindOptions, Loaders, OptionsBlock, TaskType};
use crate::signal::SignalRule;

/// `models.yaml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// The registered models.
    models: Vec<RawModel>,
    /// Limits for every model (each has a documented default).
    #[serde(default)]
    limits: Option<RawLimits>,
}

/// `limits:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    /// Largest model file, in MiB (default 1024); a larger file is refused
    /// from its size, without being read.
    #[serde(default)]
    max_model_mb: Option<u64>,
    /// Default deadline of a model's load, including its warm-up (ms).
    #[serde(default)]
    load_timeout_ms: Option<u64>,
    /// Default deadline of one inference call (ms).
    #[serde(default)]
    inference_timeout_ms: Option<u64>,
}

/// One entry of `models:` as written. Besides these fields an entry may
/// carry its kind's options block, under the kind's name (`onnx:`,
/// `torch:`, a user kind's own); anything else is refused.
#[derive(Debug, Deserialize)]
struct RawModel {
    /// Unique name; feature events name the model they are for.
    name: String,
    /// Model file, relative to the YAML file's folder (or absolute).
    path: String,
    /// File format: lightgbm | xgboost | catboost | onnx | pickle | torch,
    /// or a kind a program built on the library registered.
    kind: String,
    /// Feature names, in the order the model expects them.
    features: Vec<String>,
    /// Name of the predicted column (documentation and output labelling).
    target: String,
    /// regression | classification.
    task_type: String,
    /// Version label; defaults to the first 12 hex digits of the SHA256.
    #[serde(default)]
    version: Option<String>,
    /// Pinned SHA256 (64 hex digits); a file that differs is refused.
    #[serde(default)]
    sha256: Option<String>,
    /// Load on first use instead of at start-up.
    #[serde(default)]
    lazy: bool,
    /// `ml-worker run` starts even when this model's pinned `sha256` does
    /// not match its file (the model is refused and audited; its events go
    /// to the dead letters, or its fallback serves). Default: a wrong pin
    /// refuses start-up.
    #[serde(default)]
    optional: bool,
    /// Another model's name that serves requests when this one cannot.
    #[serde(default)]
    fallback: Option<String>,
    /// Another model that scores the same events; its predictions go to
    /// the shadow topic only (never signals).
    #[serde(default)]
    shadow: Option<String>,
    /// Another model that serves a stable share of the symbols instead of
    /// this one, its signals real.
    #[serde(default)]
    canary: Option<Canary>,
    /// Free text.
    #[serde(default)]
    description: Option<String>,
    /// How predictions become trading signals (none: no signals).
    #[serde(default)]
    signal: Option<SignalRule>,
    /// What happens to an event whose feature is absent or NaN: `nan`
    /// (pass NaN; tree models route it down their default branch) or
    /// `reject` (dead-letter the event). Default: what the model can do:
    /// `nan` for trees that record a direction for missing values
    /// (LightGBM, XGBoost, CatBoost, their pickles, scikit-learn >= 1.3
    /// trees, ONNX graphs with a tree-ensemble operator), `reject` for
    /// linear models, networks and other ONNX graphs.
    #[serde(default)]
    missing: Option<MissingPolicy>,
    /// This model's load deadline, including its warm-up (ms); default
    /// `limits.load_timeout_ms`.
    #[serde(default)]
    load_timeout_ms: Option<u64>,
    /// This model's deadline for one inference call (ms); default
    /// `limits.inference_timeout_ms`.
    #[serde(default)]
    inference_timeout_ms: Option<u64>,
    /// Every other key: the kind's options block, or a mistake.
    #[serde(flatten)]
    rest: OtherKeys,
}

/// An entry's keys beyond its fields, each at most once (a map would keep
/// the last of two blocks of one name silently).
#[derive(Debug, Default)]
struct OtherKeys(BTreeMap<String, serde_norway::Value>);

impl<'de> Deserialize<'de> for OtherKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = OtherKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a model entry")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OtherKeys, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, serde_norway::Value>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate field `{}`",
                            crate::text::escape(&short(&k))
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(OtherKeys(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// At most 100 characters of an untrusted name, for messages.
fn short(s: &str) -> String {
    match s.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The fields of a `models:` entry, for the unknown-field error.
const ENTRY_FIELDS: &str =
    "name, path, kind, features, target, task_type, version, sha256, lazy, optional, \
     fallback, shadow, canary, description, signal, missing, load_timeout_ms, inference_timeout_ms, \
     and the kind's options block under its name";

/// `canary:`: another model serves `percent` of the symbols (chosen by a
/// hash of the model's name and the symbol: a symbol stays with one model
/// while the setting holds, across restarts and replicas).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// The model that serves the canary's symbols.
    pub model: String,
    /// Share of symbols, 0 to 100 (hundredths of a point are kept).
    pub percent: f64,
}

/// What one model may cost: file size and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelLimits {
    /// Largest model file, in bytes.
    pub max_bytes: u64,
    /// A load (read, verify, parse, warm-up) that takes longer is refused.
    pub load_timeout: Duration,
    /// An inference call that takes longer fails its rows and marks the
    /// model unhealthy.
    pub inference_timeout: Duration,
}

/// Default `limits.load_timeout_ms`.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `limits.inference_timeout_ms`.
pub const DEFAULT_INFERENCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest deadline either timeout may be set to (one hour).
const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Largest `limits.max_model_mb` (64 GiB).
const MAX_MODEL_MB: u64 = 65_536;
pub use crate::model::MAX_FEATURES;
/// Largest registry file read (16 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

impl Default for ModelLimits {
    fn default() -> Self {
        ModelLimits {
            max_bytes: crate::checksum::DEFAULT_MAX_MODEL_BYTES,
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            inference_timeout: DEFAULT_INFERENCE_TIMEOUT,
        }
    }
}

/// A validated registry entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// Resolved against the registry file's folder.
    pub path: PathBuf,
    /// The loader that reads it (see [`crate::model::ModelLoader`]).
    pub kind: String,
    pub features: Vec<String>,
    pub target: String,
    pub task_type: TaskType,
    pub version: Option<String>,
    /// Lower-case hex.
    pub sha256: Option<String>,
    pub lazy: bool,
    /// A wrong pin does not stop `ml-worker run` (see [`RawModel`]).
    pub optional: bool,
    pub fallback: Option<String>,
    /// Scores the same events; predictions to the shadow topic only.
    pub shadow: Option<String>,
    /// Serves a stable share of the symbols.
    pub canary: Option<Canary>,
    pub description: Option<String>,
    /// The kind's options block, as its loader parsed it.
    pub options: KindOptions,
    pub signal: Option<SignalRule>,
    /// `missing:` when set; else the loaded model decides (see [`RawModel`]).
    pub missing: Option<MissingPolicy>,
    pub limits: ModelLimits,
}

/// A registry file problem, with the file, the model and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid YAML: {message}")]
    Yaml { file: PathBuf, message: String },
    #[error("{file}: model '{model}': field '{field}': {message}")]
    Field {
        file: PathBuf,
        model: String,
        field: String,
        message: String,
    },
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("{file}: field '{field}': {message}")]
    Setting {
        file: PathBuf,
        field: String,
        message: String,
    },
}

/// Reads and validates a registry file (the built-in kinds).
pub fn load_registry_file(file: &Path) -> Result<Vec<ModelSpec>, ConfigError> {
    load_registry_file_with(file, &crate::model::kinds::builtin(&Default::default()))
}

/// Reads and validates a registry file whose kinds are `loaders`'.
pub fn load_registry_file_with(
    file: &Path,
    loaders: &Loaders,
) -> Result<Vec<ModelSpec>, ConfigError> {
    let text = read_config_file(file)?;
    let base = file.parent().unwrap_or(Path::new("."));
    parse_registry_with(&text, file, base, loaders)
}

/// Reads a configuration file: a regular file of at most
/// [`MAX_CONFIG_BYTES`], UTF-8.
pub fn read_config_file(file: &Path) -> Result<String, ConfigError> {
    let read = |source: std::io::Error| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    };
    let (bytes, _) =
        crate::checksum::read_and_hash(file, MAX_CONFIG_BYTES).map_err(|e| match e {
            crate::checksum::FileError::Io(e) | crate::checksum::FileError::Missing(e) => read(e),
            crate::checksum::FileError::TooLarge { size, .. } => read(std::io::Error::other(format!(
                "{size} bytes: a configuration file may hold at most {MAX_CONFIG_BYTES} bytes (16 MiB)"
            ))),
            other => read(std::io::Error::other(other.to_string())),
        })?;
    String::from_utf8(bytes).map_err(|_| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

/// Parses and validates registry YAML (the built-in kinds); `base`
/// resolves relative model paths.
pub fn parse_registry(text: &str, file: &Path, base: &Path) -> Result<Vec<ModelSpec>, ConfigError> {
    parse_registry_with(
        text,
        file,
        base,
        &crate::model::kinds::builtin(&Default::default()),
    )
}

/// [`parse_registry`] for the kinds of `loaders`.
pub fn parse_registry_with(
    text: &str,
    file: &Path,
    base: &Path,
    loaders: &Loaders,
) -> Result<Vec<ModelSpec>, ConfigError> {
    let raw: RawRegistry = serde_norway::from_str(text).map_err(|e| ConfigError::Yaml {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    validate(raw, file, base, loaders)
}

fn validate(
    raw: RawRegistry,
    file: &Path,
    base: &Path,
    loaders: &Loaders,
) -> Result<Vec<ModelSpec>, ConfigError> {
    if raw.models.is_empty() {
        return Err(ConfigError::File {
            file: file.to_path_buf(),
            message: "'models' is empty: register at least one model".into(),
        });
    }
    let defaults = registry_limits(raw.limits.unwrap_or_default(), file)?;
    let mut seen = HashSet::new();
    let mut specs = Vec::with_capacity(raw.models.len());
    for (i, m) in raw.models.into_iter().enumerate() {
        let model = if m.name.trim().is_empty() {
            format!("#{}", i + 1)
        } else {
            m.name.clone()
        };
        let field = |field: &str, message: String| ConfigError::Field {
            file: file.to_path_buf(),
            model: model.clone(),
            field: field.to_string(),
            message,
        };
        if m.name.trim().is_empty()
            || m.name.trim() != m.name
            || m.name.chars().any(char::is_control)
        {
            return Err(field(
                "name",
                "must be non-empty, without surrounding spaces or control characters".into(),
            ));
        }
        if !seen.insert(m.name.clone()) {
            return Err(field("name", "duplicate model name".into()));
        }
        if m.path.trim().is_empty() {
            return Err(field("path", "must not be empty".into()));
        }
        let Some(loader) = loaders.get(&m.kind) else {
            return Err(field(
                "kind",
                format!(
                    "unknown kind '{}' (the kinds available: {})",
                    crate::text::escape(&short(&m.kind)),
                    loaders.kinds().join(", ")
                ),
            ));
        };
        let kind = m.kind.clone();
        let task_type = match m.task_type.as_str() {
            "regression" => TaskType::Regression,
            "classification" => TaskType::Classification,
            other => {
                return Err(field(
                    "task_type",
                    format!("unknown task_type '{other}' (expected regression or classification)"),
                ))
            }
        };
        if m.features.is_empty() {
            return Err(field("features", "must list at least one feature".into()));
        }
        if m.features.len() > MAX_FEATURES {
            return Err(field(
                "features",
                format!(
                    "lists {} features; at most {MAX_FEATURES} are supported",
                    m.features.len()
                ),
            ));
        }
        let mut fseen = HashSet::new();
        for f in &m.features {
            if f.trim().is_empty() {
                return Err(field("features", "a feature name is empty".into()));
            }
            if !fseen.insert(f.as_str()) {
                return Err(field("features", format!("feature '{f}' is listed twice")));
            }
        }
        if m.target.trim().is_empty() {
            return Err(field("target", "must not be empty".into()));
        }
        let sha256 = match m.sha256 {
            Some(s) => {
                let s = s.trim().to_ascii_lowercase();
                if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(field("sha256", format!("'{s}' is not 64 hex digits")));
                }
                Some(s)
            }
            None => None,
        };
        if let Some(v) = &m.version {
            if v.trim().is_empty() {
                return Err(field("version", "must not be empty when given".into()));
            }
        }
        if let Some(rule) = &m.signal {
            rule.validate().map_err(|e| field("signal", e))?;
            match (rule, task_type) {
                (SignalRule::Threshold { .. }, TaskType::Classification) => {
                    return Err(field("signal", "a classification model needs 'classes' (and 'min_probability'), not thresholds".into()))
                }
                (SignalRule::Classes { .. }, TaskType::Regression) => {
                    return Err(field("signal", "a regression model needs 'buy_above' and 'sell_below', not classes".into()))
                }
                _ => {}
            }
        }
        let mut block = None;
        for (key, value) in m.rest.0 {
            if key == kind {
                block = Some(value);
            } else if loaders.get(&key).is_some() {
                return Err(field(
                    &key,
                    format!("only applies to kind {key}, this model is {kind}"),
                ));
            } else {
                return Err(field(
                    &crate::text::escape(&short(&key)),
                    format!("unknown field (expected one of: {ENTRY_FIELDS})"),
                ));
            }
        }
        let head = EntryHead {
            name: &m.name,
            task_type,
            features: &m.features,
        };
        let options_key = block
            .as_ref()
            .map(|v| serde_norway::to_string(v).unwrap_or_default())
            .unwrap_or_default();
        // a loader's panic (a user's kind) is its error, not the process's end
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            loader.parse_options(block.map(OptionsBlock::new).as_ref(), &head)
        }))
        .unwrap_or_else(|_| Err(format!("the '{kind}' loader panicked parsing the block")));
        let options = parsed.map_err(|e| field(&kind, e))?.with_key(options_key);
        let timeout = |v: Option<u64>, default: Duration, name: &'static str| match v {
            None => Ok(default),
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
            Some(ms) => Err(field(
                name,
                format!("{ms} is out of range (1 to {MAX_TIMEOUT_MS} ms)"),
            )),
        };
        let limits = ModelLimits {
            max_bytes: defaults.max_bytes,
            load_timeout: timeout(m.load_timeout_ms, defaults.load_timeout, "load_timeout_ms")?,
            inference_timeout: timeout(
                m.inference_timeout_ms,
                defaults.inference_timeout,
                "inference_timeout_ms",
            )?,
        };
        let path = Path::new(&m.path);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        specs.push(ModelSpec {
            name: m.name,
            path,
            kind,
            features: m.features,
            target: m.target,
            task_type,
            version: m.version,
            sha256,
            lazy: m.lazy,
            optional: m.optional,
            fallback: m.fallback,
            shadow: m.shadow,
            canary: m.canary,
            description: m.description,
            options,
            signal: m.signal,
            missing: m.missing,
            limits,
        });
    }
    check_fallbacks(&specs, file)?;
    check_routes(&specs, file)?;
    Ok(specs)
}

/// A shadow or canary names another registered model of the same task,
/// and a canary's share is a percentage.
fn check_routes(specs: &[ModelSpec], file: &Path) -> Result<(), ConfigError> {
    let by_name: HashMap<&str, &ModelSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in specs {
        let targets = [
            ("shadow", s.shadow.as_deref()),
            ("canary", s.canary.as_ref().map(|c| c.model.as_str())),
        ];
        for (field, target) in targets {
            let Some(other) = target else { continue };
            let err = |message: String| ConfigError::Field {
                file: file.to_path_buf(),
                model: s.name.clone(),
                field: field.into(),
                message,
            };
            let Some(o) = by_name.get(other) else {
                return Err(err(format!(
                    "'{}' is not a registered model",
                    crate::text::escape(&short(other))
                )));
            };
            if other == s.name {
                return Err(err("names the model itself".into()));
            }
            if o.task_type != s.task_type {
                return Err(err(format!(
                    "'{other}' is a {} model, this one is {}",
                    o.task_type, s.task_type
                )));
            }
            // a canary's outputs are real: it must find its features in
            // events written for this model (a shadow may need more: what
            // the events lack is missing, its outputs only compared)
            let foreign: Vec<&str> = o
                .features
                .iter()
                .filter(|f| !s.features.contains(f))
                .map(String::as_str)
                .collect();
            if field == "canary" && !foreign.is_empty() {
                return Err(err(format!(
                    "'{other}' needs features this model's events need not carry: {} \
                     (a canary's features must be among this model's)",
                    foreign
                        .iter()
                        .take(5)
                        .map(|f| crate::text::escape(f).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        if let Some(c) = &s.canary {
            if !(c.percent.is_finite() && (0.0..=100.0).contains(&c.percent)) {
                return Err(ConfigError::Field {
                    file: file.to_path_buf(),
                    model: s.name.clone(),
                    field: "canary.percent".into(),
                    message: format!("{} is not within 0 to 100", c.percent),
                });
            }
        }
    }
    Ok(())
}

/// The validated `limits:` block (defaults where absent).
fn registry_limits(raw: RawLimits, file: &Path) -> Result<ModelLimits, ConfigError> {
    let err = |field: &str, message: String| ConfigError::Setting {
        file: file.to_path_buf(),
        field: format!("limits.{field}"),
        message,
    };
    let d = ModelLimits::default();
    let max_bytes = match raw.max_model_mb {
        None => d.max_bytes,
        Some(mb) if (1..=MAX_MODEL_MB).contains(&mb) => mb << 20,
        Some(mb) => {
            return Err(err(
                "max_model_mb",
                format!("{mb} is out of range (1 to {MAX_MODEL_MB})"),
            ))
        }
    };
    let timeout = |v: Option<u64>, default: Duration, name: &str| match v {
        None => Ok(default),
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
        Some(ms) => Err(err(
            name,
            format!("{ms} is out of range (1 to {MAX_TIMEOUT_MS} ms)"),
        )),
    };
    Ok(ModelLimits {
        max_bytes,
        load_timeout: timeout(raw.load_timeout_ms, d.load_timeout, "load_timeout_ms")?,
        inference_timeout: timeout(
            raw.inference_timeout_ms,
            d.inference_timeout,
            "inference_timeout_ms",
        )?,
    })
}

/// Every fallback names another registered model, and following fallbacks
/// never comes back to where it started.
fn check_fallbacks(specs: &[ModelSpec], file: &Path) -> Result<(), ConfigError> {
    let by_name: HashMap<&str, &ModelSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in specs {
        let Some(fb) = &s.fallback else { continue };
        let err = |message: String| ConfigError::Field {
            file: file.to_path_buf(),
            model: s.name.clone(),
            field: "fallback".into(),
            message,
        };
        if !by_name.contains_key(fb.as_str()) {
            return Err(err(format!("'{fb}' is not a registered model")));
        }
        let mut chain = vec![s.name.as_str()];
        let mut at = fb.as_str();
        loop {
            if chain.contains(&at) {
                chain.push(at);
                return Err(err(format!(
                    "fallbacks form a cycle: {}",
                    chain.join(" -> ")
                )));
            }
            chain.push(at);
            match by_name.get(at).and_then(|m| m.fallback.as_deref()) {
                Some(next) => at = next,
                None => break,
            }
        }
        let fallback = by_name[fb.as_str()];
        if fallback.task_type != s.task_type {
            return Err(err(format!(
                "'{fb}' is a {} model, this one is {}",
                fallback.task_type, s.task_type
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
models:
  - name: "a"
    path: "models/a.txt"
    kind: "lightgbm"
    features: ["x", "y"]
    target: "t"
    task_type: "regression"
  - name: "b"
    path: "/abs/b.json"
    kind: "xgboost"
    features: ["x", "y"]
    target: "t"
    task_type: "regression"
    fallback: "a"
    lazy: true
    sha256: "ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB"
"#;

    fn parse(text: &str) -> Result<Vec<ModelSpec>, ConfigError> {
        parse_registry(text, Path::new("config/models.yaml"), Path::new("config"))
    }

    #[test]
    fn parses_and_resolves_paths() {
        let specs = parse(OK).unwrap();
        assert_eq!(specs[0].path, Path::new("config/models/a.txt"));
        assert_eq!(specs[1].path, Path::new("/abs/b.json"));
        assert_eq!(specs[1].sha256.as_deref(), Some(&"ab".repeat(32)[..]));
        assert!(specs[1].lazy);
    }

    fn err_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_model_and_field() {
        let e = err_of(&OK.replace("kind: \"xgboost\"", "kind: \"sklearn\""));
        assert!(
            e.contains("config/models.yaml") && e.contains("model 'b'") && e.contains("'kind'"),
            "{e}"
        );
        let e = err_of(&OK.replace("name: \"b\"", "name: \"a\""));
        assert!(e.contains("duplicate"), "{e}");
        let e = err_of(&OK.replace("lazy: true", "lazy: true\n    colour: red"));
        assert!(e.contains("unknown field") && e.contains("colour"), "{e}");
        let e = err_of(&OK.replace("fallback: \"a\"", "fallback: \"zz\""));
        assert!(e.contains("'fallback'") && e.contains("zz"), "{e}");
        let e = err_of(&OK.replace(
            "task_type: \"regression\"\n  - name",
            "task_type: \"ranking\"\n  - name",
        ));
        assert!(e.contains("model 'a'") && e.contains("task_type"), "{e}");
        let e = err_of(&OK.replace(
            "\"x\", \"y\"]\n    target: \"t\"\n    task_type: \"regression\"\n    fallback",
            "\"x\", \"x\"]\n    target: \"t\"\n    task_type: \"regression\"\n    fallback",
        ));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn signal_rules_must_fit_the_task_type() {
        let ok = OK.replace(
            "    lazy: true\n",
            "    lazy: true\n    signal: {buy_above: 0.1, sell_below: -0.1}\n",
        );
        let specs = parse(&ok).unwrap();
        assert!(matches!(
            specs[1].signal,
            Some(SignalRule::Threshold { .. })
        ));
        let bad = OK.replace(
            "    lazy: true\n",
            "    lazy: true\n    signal: {classes: {1: BUY}}\n",
        );
        let e = err_of(&bad);
        assert!(
            e.contains("model 'b'") && e.contains("'signal'") && e.contains("regression model"),
            "{e}"
        );
        let bad = OK.replace(
            "    lazy: true\n",
            "    lazy: true\n    signal: {buy_above: -1, sell_below: 1}\n",
        );
        assert!(err_of(&bad).contains("below sell_below"));
    }

    #[test]
    fn fallback_cycles_are_refused() {
        let text = OK.replace(
            "task_type: \"regression\"\n  - name",
            "task_type: \"regression\"\n    fallback: \"b\"\n  - name",
        );
        let e = err_of(&text);
        assert!(e.contains("cycle"), "{e}");
    }

    #[test]
    fn bad_yaml_is_reported_with_the_file() {
        let e = err_of("models: [");
        assert!(e.contains("config/models.yaml: invalid YAML"), "{e}");
    }
}
