//! The README's configuration reference names every field `worker.yaml` and
//! `models.yaml` accept: the accepted fields are found from the parsers
//! themselves (a probe key in each section makes serde list the section's
//! fields; a field that takes a mapping is a section of its own), so adding
//! a field without documenting it fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const PROBE: &str = "zz_probe_field";

/// The field names serde lists in an unknown-field error for `PROBE`.
fn listed(error: &str) -> Option<Vec<String>> {
    let at = error.find(&format!("unknown field `{PROBE}`"))?;
    let rest = &error[at..];
    let rest = &rest[rest.find("expected")?..];
    let names = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect::<Vec<_>>();
    Some(names)
}

fn get_mut<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
    let mut at = v;
    for k in path {
        let m = at.as_mapping_mut().expect("a mapping on the path");
        let key = Value::String(k.clone());
        if !m.contains_key(&key) {
            m.insert(key.clone(), Value::Mapping(Mapping::new()));
        }
        at = m.get_mut(&key).expect("inserted");
    }
    at
}

/// Every accepted field under `path` of `base` (dotted), recursing into
/// fields that take a mapping. `parse` says why a document is refused.
fn fields(
    base: &Value,
    path: Vec<String>,
    parse: &dyn Fn(&Value) -> Result<(), String>,
    out: &mut BTreeSet<String>,
) {
    let mut probe = base.clone();
    {
        let at = get_mut(&mut probe, &path);
        if !at.is_mapping() {
            *at = Value::Mapping(Mapping::new());
        }
        at.as_mapping_mut()
            .expect("made a mapping")
            .insert(PROBE.into(), Value::from(1));
    }
    let Some(names) = parse(&probe).err().as_deref().and_then(listed) else {
        return; // not a section
    };
    for name in names {
        let mut p = path.clone();
        p.push(name);
        out.insert(p.join("."));
        fields(base, p, parse, out);
    }
}

/// The backticked names in the README's configuration reference section.
fn documented(section: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find(section)
        .unwrap_or_else(|| panic!("README has no section {section}"));
    let body = &readme[start + section.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    body.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every accepted leaf field (a section's fields stand for it) must be
/// documented.
fn check(kind: &str, accepted: &BTreeSet<String>, documented: &BTreeSet<String>) {
    let section = |f: &String| accepted.iter().any(|g| g.starts_with(&format!("{f}.")));
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|f| !section(f) && !documented.contains(*f))
        .collect();
    assert!(
        missing.is_empty(),
        "{kind} fields without a line in the README's configuration reference: {missing:?}"
    );
    eprintln!("{kind}: {} fields, all documented", accepted.len());
}

#[test]
fn every_worker_yaml_field_is_in_the_readme_reference() {
    let file = root().join("config/worker.yaml");
    let mut base: Value = serde_norway::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    // sections the shipped file leaves out
    let m = base.as_mapping_mut().unwrap();
    m.insert(
        "schema_registry".into(),
        serde_norway::from_str("{url: \"http://registry:8081\"}").unwrap(),
    );
    let parse = |v: &Value| {
        let text = serde_norway::to_string(v).unwrap();
        ml_worker::worker::config::parse_worker_config(
            &text,
            &file,
            &ml_worker::worker::config::Overrides::default(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let mut accepted = BTreeSet::new();
    fields(&base, Vec::new(), &parse, &mut accepted);
    // a per-model override is a section under any model's name
    let mut per_model = BTreeSet::new();
    fields(
        &base,
        vec!["batching".into(), "per_model".into(), "MODEL".into()],
        &parse,
        &mut per_model,
    );
    accepted.extend(per_model);
    assert!(accepted.contains("kafka.brokers") && accepted.contains("delivery.mode"));
    assert!(accepted.len() > 30, "{accepted:?}");
    check(
        "worker.yaml",
        &accepted,
        &documented("### `worker.yaml` reference"),
    );
}

#[test]
fn every_models_yaml_field_is_in_the_readme_reference() {
    let file = root().join("config/models.yaml");
    let base: Value = serde_norway::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let parse = |v: &Value| {
        let text = serde_norway::to_string(v).unwrap();
        ml_worker::config::parse_registry(&text, &file, file.parent().unwrap_or(Path::new(".")))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mut accepted = BTreeSet::new();
    // the top level and `limits:`
    fields(&base, Vec::new(), &parse, &mut accepted);
    accepted.remove("models");
    // an entry: its loader's error lists the fields (`expected one of: a, b`)
    let mut probe = base.clone();
    let first = &mut probe["models"][0];
    first
        .as_mapping_mut()
        .unwrap()
        .insert(PROBE.into(), Value::from(1));
    let e = parse(&probe).unwrap_err();
    let list = e
        .split("expected one of:")
        .nth(1)
        .unwrap_or_else(|| panic!("{e}"));
    // (the last item is the kind's options block, documented per kind)
    for f in list.split(',').map(|f| f.trim().trim_end_matches(')')) {
        if !f.is_empty() && !f.contains(' ') {
            accepted.insert(format!("models[].{f}"));
        }
    }
    // sections inside an entry
    for (field, value) in [
        ("canary", "{model: \"breast_cancer_xgb\", percent: 5}"),
        ("signal", "{buy_above: 1.0, sell_below: 0.0}"),
    ] {
        let mut b = base.clone();
        b["models"][0]
            .as_mapping_mut()
            .unwrap()
            .insert(field.into(), serde_norway::from_str(value).unwrap());
        let mut inner = BTreeSet::new();
        let probe_parse = |v: &Value| parse(v);
        let mut p = b.clone();
        p["models"][0][field]
            .as_mapping_mut()
            .unwrap()
            .insert(PROBE.into(), Value::from(1));
        if let Some(names) = probe_parse(&p).err().as_deref().and_then(listed) {
            for n in names {
                inner.insert(format!("models[].{field}.{n}"));
            }
        }
        assert!(!inner.is_empty(), "{field}: no fields listed");
        accepted.extend(inner);
    }
    for f in ["models[].name", "models[].task_type", "limits.max_model_mb"] {
        assert!(accepted.contains(f), "{f} not found: {accepted:?}");
    }
    check(
        "models.yaml",
        &accepted,
        &documented("### `models.yaml` reference"),
    );
}
