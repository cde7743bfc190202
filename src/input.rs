//! Feature files for offline prediction: CSV with a header of feature names
//! (an empty cell is missing) or JSON lines of `{"feature": value}` objects
//! (an absent key or `null` is missing). Rows come out in the model's
//! feature order; columns the model does not use are ignored.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

/// A feature file problem, with the file, row and column.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: header lacks feature column(s) {missing:?} the model needs (header has {header:?})")]
    MissingColumns {
        file: String,
        missing: Vec<String>,
        header: Vec<String>,
    },
    #[error("{file}: line {line}: {message}")]
    Row {
        file: String,
        line: usize,
        message: String,
    },
}

/// Rows in feature order, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub data: Vec<f64>,
    pub n_features: usize,
}

/// Reads a CSV or JSON-lines file (chosen by extension: `.jsonl`/`.json`/`.ndjson` are JSON lines).
pub fn read_rows(path: &Path, features: &[String]) -> Result<Rows, InputError> {
    let file = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let f = std::fs::File::open(path).map_err(|source| InputError::Io {
        file: file.clone(),
        source,
    })?;
    let reader = std::io::BufReader::new(f);
    if matches!(ext.as_str(), "jsonl" | "json" | "ndjson") {
        read_jsonl(reader, &file, features)
    } else {
        read_csv(reader, &file, features)
    }
}

/// Parses one CSV cell: empty, `nan`, `NA`, `null` are missing.
fn parse_cell(s: &str) -> Result<f64, String> {
    let t = s.trim();
    if t.is_empty()
        || t.eq_ignore_ascii_case("nan")
        || t.eq_ignore_ascii_case("na")
        || t.eq_ignore_ascii_case("null")
    {
        return Ok(f64::NAN);
    }
    t.parse::<f64>()
        .map_err(|_| format!("'{t}' is not a number"))
}

pub fn read_csv<R: std::io::Read>(
    r: R,
    file: &str,
    features: &[String],
) -> Result<Rows, InputError> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(r);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| InputError::Row {
            file: file.into(),
            line: 1,
            message: e.to_string(),
        })?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut pos: HashMap<&str, usize> = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        if pos.insert(h.as_str(), i).is_some() && features.contains(h) {
            return Err(InputError::Row {
                file: file.into(),
                line: 1,
                message: format!("column '{h}' appears twice in the header"),
            });
        }
    }
    let missing: Vec<String> = features
        .iter()
        .filter(|f| !pos.contains_key(f.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(InputError::MissingColumns {
            file: file.into(),
            missing,
            header,
        });
    }
    let cols: Vec<usize> = features.iter().map(|f| pos[f.as_str()]).collect();
    let mut data = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| InputError::Row {
            file: file.into(),
            line,
            message: e.to_string(),
        })?;
        for (&c, name) in cols.iter().zip(features) {
            let cell = rec.get(c).unwrap_or("");
            let v = parse_cell(cell).map_err(|m| InputError::Row {
                file: file.into(),
                line,
                message: format!("column '{name}': {m}"),
            })?;
            data.push(v);
        }
    }
    Ok(Rows {
        data,
        n_features: features.len(),
    })
}

pub fn read_jsonl<R: BufRead>(r: R, file: &str, features: &[String]) -> Result<Rows, InputError> {
    let mut data = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| InputError::Io {
            file: file.into(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let row_err = |message: String| InputError::Row {
            file: file.into(),
            line: line_no,
            message,
        };
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).map_err(|e| row_err(format!("not a JSON object: {e}")))?;
        for name in features {
            let v = match obj.get(name) {
                None | Some(serde_json::Value::Null) => f64::NAN,
                Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(serde_json::Value::String(s)) => {
                    parse_cell(s).map_err(|m| row_err(format!("feature '{name}': {m}")))?
                }
                Some(other) => {
                    return Err(row_err(format!(
                        "feature '{name}': {other} is not a number"
                    )))
                }
            };
            data.push(v);
        }
    }
    Ok(Rows {
        data,
        n_features: features.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn csv_reorders_columns_and_reads_missing_cells() {
        let rows = read_csv(
            "b,extra,a\n1,x,2\n,y,3.5\n".as_bytes(),
            "t.csv",
            &f(&["a", "b"]),
        )
        .unwrap();
        assert_eq!(rows.data[..3], [2.0, 1.0, 3.5]);
        assert!(rows.data[3].is_nan());
    }

    #[test]
    fn csv_missing_column_is_named() {
        let e = read_csv("a,c\n1,2\n".as_bytes(), "t.csv", &f(&["a", "b"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"b\"") && e.contains("t.csv"), "{e}");
    }

    #[test]
    fn csv_duplicate_feature_column_is_an_error() {
        let e = read_csv("a,b,a\n1,2,3\n".as_bytes(), "t.csv", &f(&["a", "b"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'a' appears twice"), "{e}");
    }

    #[test]
    fn csv_bad_cell_names_line_and_column() {
        let e = read_csv("a\n1\nfoo\n".as_bytes(), "t.csv", &f(&["a"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("column 'a'"), "{e}");
    }

    #[test]
    fn jsonl_reads_absent_and_null_as_missing() {
        let rows = read_jsonl(
            "{\"a\": 1, \"b\": null}\n\n{\"b\": 2}\n".as_bytes(),
            "t.jsonl",
            &f(&["a", "b"]),
        )
        .unwrap();
        assert_eq!(rows.data[0], 1.0);
        assert!(rows.data[1].is_nan() && rows.data[2].is_nan());
        assert_eq!(rows.data[3], 2.0);
        let e = read_jsonl("[1]\n".as_bytes(), "t.jsonl", &f(&["a"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
