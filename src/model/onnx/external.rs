//! ONNX external data, resolved and confined before ONNX Runtime sees the
//! model.
//!
//! A tensor in an ONNX file may say its bytes live in another file
//! (`data_location: EXTERNAL`, `external_data: {location, offset, length}`).
//! ONNX Runtime, given the model as bytes, would resolve `location` against
//! the process's working directory: a model could read any file there (a
//! config with passwords) back out as weights. So the model is rewritten
//! first: every external tensor, wherever it sits (initializers, sparse
//! initializers, node attributes, subgraphs of `If`/`Loop`/`Scan`, functions,
//! training info), gets its bytes inline, read from the model file's own
//! folder under these rules:
//!
//! - `location` is relative, without `..` components, and names a regular
//!   file inside the model's folder; no component of the path may be a
//!   symbolic link (so the file cannot be elsewhere);
//! - `offset` and `length` lie within the file; all external bytes together
//!   stay within the model size limit;
//! - each file's SHA256 is recorded (logged, audited, shown by
//!   `models verify`); the model's `sha256` pin covers the `.onnx` file.
//!
//! ONNX Runtime then gets a model with no external reference left, and
//! never opens a file. The rewrite works on the protobuf wire format and
//! copies every other field byte for byte.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// An external data file a model's tensors were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalFile {
    /// As the model names it (relative to the model's folder).
    pub location: String,
    pub sha256: String,
    /// Bytes taken from it.
    pub bytes_used: u64,
}

/// A model with its external data inline, and the files read.
pub type Inlined = (Vec<u8>, Vec<ExternalFile>);

/// Deepest nesting of graphs in attributes (`If` inside `Loop` ...).
const MAX_DEPTH: usize = 64;

/// The messages whose fields can lead to a `TensorProto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Model,
    Graph,
    Node,
    Attribute,
    Tensor,
    SparseTensor,
    Function,
    TrainingInfo,
}

/// The message kind of field `field` of `msg`, when it can hold tensors.
fn child(msg: Msg, field: u64) -> Option<Msg> {
    use Msg::*;
    Some(match (msg, field) {
        (Model, 7) => Graph,
        (Model, 20) => TrainingInfo,
        (Model, 25) => Function,
        (Graph, 1) => Node,
        (Graph, 5) => Tensor,
        (Graph, 15) => SparseTensor,
        (Node, 5) => Attribute,
        (Attribute, 5 | 10) => Tensor,
        (Attribute, 6 | 11) => Graph,
        (Attribute, 22 | 23) => SparseTensor,
        (SparseTensor, 1 | 2) => Tensor,
        (Function, 7) => Node,
        (Function, 11) => Attribute,
        (TrainingInfo, 1 | 2) => Graph,
        _ => return None,
    })
}

/// `TensorProto` fields.
const TENSOR_RAW_DATA: u64 = 9;
const TENSOR_EXTERNAL_DATA: u64 = 13;
const TENSOR_DATA_LOCATION: u64 = 14;
const DATA_LOCATION_EXTERNAL: i32 = 1;

/// One field of a message: its number, wire type, and the bytes of the
/// whole field (key included) and of its payload.
struct Field<'a> {
    number: u64,
    wire: u8,
    whole: &'a [u8],
    /// Length-delimited payload, or the varint's value as bytes.
    payload: &'a [u8],
    varint: u64,
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The fields of a message, in order.
fn fields(b: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let start = pos;
        let key = varint(b, &mut pos)?;
        // protobuf reads a key as at most 5 bytes and keeps 32 bits of them:
        // a longer key, or one past 32 bits, would name another field there
        // than here
        if pos - start > 5 || key > u64::from(u32::MAX) {
            return Err(format!(
                "a field key of {} bytes at byte {start} (past 32 bits: ONNX Runtime would read another field)",
                pos - start
            ));
        }
        let (number, wire) = (key >> 3, (key & 7) as u8);
        if number == 0 {
            return Err(format!("field number 0 at byte {start}"));
        }
        let (payload, value) = match wire {
            0 => {
                let v = varint(b, &mut pos)?;
                (&b[pos..pos], v)
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let end = pos
                    .checked_add(n)
                    .filter(|e| *e <= b.len())
                    .ok_or("truncated fixed field")?;
                let p = &b[pos..end];
                pos = end;
                (p, 0)
            }
            2 => {
                let n = varint(b, &mut pos)?;
                let end = usize::try_from(n)
                    .ok()
                    .and_then(|n| pos.checked_add(n))
                    .filter(|e| *e <= b.len())
                    .ok_or_else(|| {
                        format!("field {number} at byte {start} is longer than the data")
                    })?;
                let p = &b[pos..end];
                pos = end;
                (p, 0)
            }
            w => return Err(format!("unsupported wire type {w} at byte {start}")),
        };
        out.push(Field {
            number,
            wire,
            whole: &b[start..pos],
            payload,
            varint: value,
        });
    }
    Ok(out)
}

/// Reads external tensor bytes from files in one folder, under the rules
/// in the module comment.
struct Resolver<'a> {
    dir: &'a Path,
    /// Most external bytes in all.
    budget: u64,
    files: BTreeMap<String, (File, u64)>,
    used: BTreeMap<String, u64>,
}

impl Resolver<'_> {
    /// Opens `location` inside the folder: relative, no `..`, no symbolic
    /// link on the way, a regular file.
    fn open(&mut self, location: &str) -> Result<&(File, u64), String> {
        if !self.files.contains_key(location) {
            let path = confined(self.dir, location)?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| format!("external data '{location}': {e}"))?;
            let m = f
                .metadata()
                .map_err(|e| format!("external data '{location}': {e}"))?;
            if !m.file_type().is_file() {
                return Err(format!("external data '{location}' is not a regular file"));
            }
            // a hard link is a file of elsewhere under a name in the folder
            use std::os::unix::fs::MetadataExt;
            if m.nlink() > 1 {
                return Err(format!(
                    "external data '{location}' has {} hard links: it may be a file from outside the model's folder; copy it instead",
                    m.nlink()
                ));
            }
            self.files.insert(location.to_string(), (f, m.len()));
        }
        Ok(&self.files[location])
    }

    fn read(
        &mut self,
        location: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<Vec<u8>, String> {
        let budget = self.budget;
        let (f, size) = self.open(location)?;
        let size = *size;
        let length = length.unwrap_or(size.saturating_sub(offset));
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(format!(
                "external data '{location}': offset {offset} + length {length} is past its end ({size} bytes)"
            ));
        }
        if length > budget {
            return Err(
                "external data takes more than the model size limit (limits.max_model_mb) allows"
                    .to_string(),
            );
        }
        let mut buf = vec![0u8; length as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("external data '{location}': {e}"))?;
        self.budget -= length;
        *self.used.entry(location.to_string()).or_default() += length;
        Ok(buf)
    }
}

/// `dir/location`, if `location` stays inside `dir` without following a
/// symbolic link.
fn confined(dir: &Path, location: &str) -> Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty() || location.contains('\0') {
        return Err(format!(
            "external data location {location:?} is not a file name"
        ));
    }
    if rel.is_absolute() {
        return Err(format!(
            "external data location '{location}' is an absolute path; it must be relative to the model's folder"
        ));
    }
    let mut path = dir.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(part) => {
                path.push(part);
                let m = std::fs::symlink_metadata(&path).map_err(|e| {
                    format!(
                        "external data '{location}' (looked up in the model's folder {}): {e}",
                        dir.display()
                    )
                })?;
                if m.file_type().is_symlink() {
                    return Err(format!(
                        "external data location '{location}' goes through a symbolic link; it must be a file inside the model's folder"
                    ));
                }
            }
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "external data location '{location}' leaves the model's folder ('..'); it must be a file inside it"
                ))
            }
        }
    }
    Ok(path)
}

/// Rewrites `msg` (of kind `kind`); `None` when nothing in it changed.
fn rewrite(
    b: &[u8],
    kind: Msg,
    r: &mut Resolver<'_>,
    depth: usize,
) -> Result<Option<Vec<u8>>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("graphs nested deeper than {MAX_DEPTH}"));
    }
    let fields = fields(b)?;
    if kind == Msg::Tensor {
        return external_tensor(&fields, r);
    }
    let mut out: Option<Vec<u8>> = None;
    for (i, f) in fields.iter().enumerate() {
        let new = match (f.wire, child(kind, f.number)) {
            (2, Some(c)) => rewrite(f.payload, c, r, depth + 1)?,
            _ => None,
        };
        match (new, &mut out) {
            (Some(n), o) => {
                let o = o.get_or_insert_with(|| {
                    fields[..i].iter().flat_map(|f| f.whole).copied().collect()
                });
                put_varint(o, (f.number << 3) | 2);
                put_varint(o, n.len() as u64);
                o.extend_from_slice(&n);
            }
            (None, Some(o)) => o.extend_from_slice(f.whole),
            (None, None) => {}
        }
    }
    Ok(out)
}

/// A tensor with `data_location: EXTERNAL` as the same tensor with
/// `raw_data` inline; `None` for any other tensor.
fn external_tensor(fields: &[Field<'_>], r: &mut Resolver<'_>) -> Result<Option<Vec<u8>>, String> {
    // data_location as ONNX Runtime's protobuf reads it: an int32 enum
    // (a varint truncated to 32 bits: 2^32 + 1 is EXTERNAL too), the last
    // occurrence winning. Anything this reader cannot see the same way (the
    // field in another wire type, a value that is neither DEFAULT nor
    // EXTERNAL) is refused rather than guessed at.
    let mut location = 0i32;
    for f in fields.iter().filter(|f| f.number == TENSOR_DATA_LOCATION) {
        if f.wire != 0 {
            return Err(format!(
                "a tensor's data_location has wire type {}; refused",
                f.wire
            ));
        }
        location = f.varint as i32;
    }
    match location {
        0 => return Ok(None),
        DATA_LOCATION_EXTERNAL => {}
        other => {
            return Err(format!(
                "a tensor's data_location is {other}, neither DEFAULT (0) nor EXTERNAL (1); refused"
            ))
        }
    }
    let mut entries: BTreeMap<String, String> = BTreeMap::new();
    for f in fields
        .iter()
        .filter(|f| f.number == TENSOR_EXTERNAL_DATA && f.wire == 2)
    {
        let (mut k, mut v) = (String::new(), String::new());
        for e in self::fields(f.payload)? {
            let s = || {
                String::from_utf8(e.payload.to_vec())
                    .map_err(|_| "external_data entry is not UTF-8".to_string())
            };
            match (e.number, e.wire) {
                (1, 2) => k = s()?,
                (2, 2) => v = s()?,
                _ => {}
            }
        }
        entries.insert(k, v);
    }
    let location = entries
        .get("location")
        .ok_or("a tensor's data is EXTERNAL but names no location")?
        .clone();
    let number = |key: &str| -> Result<Option<u64>, String> {
        entries
            .get(key)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("external data '{location}': {key} '{v}' is not a number"))
            })
            .transpose()
    };
    let bytes = r.read(&location, number("offset")?.unwrap_or(0), number("length")?)?;
    let mut out = Vec::with_capacity(bytes.len() + 64);
    for f in fields {
        if !matches!(
            f.number,
            TENSOR_RAW_DATA | TENSOR_EXTERNAL_DATA | TENSOR_DATA_LOCATION
        ) {
            out.extend_from_slice(f.whole);
        }
    }
    put_varint(&mut out, (TENSOR_RAW_DATA << 3) | 2);
    put_varint(&mut out, bytes.len() as u64);
    out.extend_from_slice(&bytes);
    Ok(Some(out))
}

/// The model with every external tensor inline (`None`: it has none), and
/// the files read, each with its SHA256. `dir` is the model file's folder;
/// at most `limit` external bytes are read.
pub fn inline(model: &[u8], dir: &Path, limit: u64) -> Result<Option<Inlined>, String> {
    let mut r = Resolver {
        dir,
        budget: limit,
        files: BTreeMap::new(),
        used: BTreeMap::new(),
    };
    let Some(out) = rewrite(model, Msg::Model, &mut r, 0)? else {
        return Ok(None);
    };
    let mut files = Vec::new();
    for (location, (f, size)) in &r.files {
        files.push(ExternalFile {
            location: location.clone(),
            sha256: sha256_of(f, *size).map_err(|e| format!("external data '{location}': {e}"))?,
            bytes_used: r.used.get(location).copied().unwrap_or(0),
        });
    }
    Ok(Some((out, files)))
}

/// SHA256 of an open file's first `size` bytes.
/// The operator types of the main graph's nodes (`ModelProto.graph.node[*].op_type`).
pub fn graph_ops(model: &[u8]) -> Result<Vec<String>, String> {
    let mut ops = Vec::new();
    for graph in fields(model)?
        .iter()
        .filter(|f| f.number == 7 && f.wire == 2)
    {
        for node in fields(graph.payload)?
            .iter()
            .filter(|f| f.number == 1 && f.wire == 2)
        {
            for op in fields(node.payload)?
                .iter()
                .filter(|f| f.number == 4 && f.wire == 2)
            {
                ops.push(String::from_utf8_lossy(op.payload).into_owned());
            }
        }
    }
    Ok(ops)
}

fn sha256_of(f: &File, size: u64) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut o = Vec::new();
        put_varint(&mut o, (number << 3) | 2);
        put_varint(&mut o, payload.len() as u64);
        o.extend_from_slice(payload);
        o
    }

    fn entry(k: &str, v: &str) -> Vec<u8> {
        field(
            13,
            &[field(1, k.as_bytes()), field(2, v.as_bytes())].concat(),
        )
    }

    /// ModelProto { graph { initializer { name, external_data..., data_location: EXTERNAL } } }
    fn model(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut t = field(8, b"w");
        for (k, v) in entries {
            t.extend(entry(k, v));
        }
        t.extend([14 << 3, 1]);
        field(7, &field(5, &t))
    }

    #[test]
    fn sibling_data_is_inlined_and_nothing_else_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.bin"), b"0123456789").unwrap();
        let m = [
            field(1, b"x"),
            model(&[("location", "w.bin"), ("offset", "2"), ("length", "4")]),
        ]
        .concat();
        let (out, files) = inline(&m, dir.path(), 1 << 20).unwrap().unwrap();
        let want = [
            field(1, b"x"),
            field(7, &field(5, &[field(8, b"w"), field(9, b"2345")].concat())),
        ]
        .concat();
        assert_eq!(out, want);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].bytes_used, 4);
        assert_eq!(
            files[0].sha256,
            crate::checksum::sha256_bytes(b"0123456789")
        );
        // a model without external data is left alone
        assert!(inline(&want, dir.path(), 1 << 20).unwrap().is_none());
    }

    #[test]
    fn locations_outside_the_folder_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("models");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(root.path().join("secret"), b"password").unwrap();
        std::fs::write(dir.join("sub/ok.bin"), b"abcd").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), dir.join("link.bin")).unwrap();
        std::os::unix::fs::symlink(root.path(), dir.join("linkdir")).unwrap();
        let refused = |loc: &str| inline(&model(&[("location", loc)]), &dir, 1 << 20).unwrap_err();
        assert!(refused("../secret").contains("leaves the model's folder"));
        assert!(refused("sub/../../secret").contains("leaves the model's folder"));
        let abs = root.path().join("secret");
        assert!(refused(abs.to_str().unwrap()).contains("absolute path"));
        assert!(refused("link.bin").contains("symbolic link"));
        assert!(refused("linkdir/secret").contains("symbolic link"));
        assert!(refused("absent.bin").contains("No such file"));
        assert!(refused("sub").contains("not a regular file"));
        std::fs::hard_link(root.path().join("secret"), dir.join("hard.bin")).unwrap();
        assert!(refused("hard.bin").contains("hard links"));
        let e = inline(
            &model(&[("location", "sub/ok.bin"), ("offset", "2"), ("length", "9")]),
            &dir,
            1 << 20,
        )
        .unwrap_err();
        assert!(e.contains("past its end"), "{e}");
        let e = inline(&model(&[("location", "sub/ok.bin")]), &dir, 3).unwrap_err();
        assert!(e.contains("size limit"), "{e}");
        assert!(inline(&model(&[("location", "sub/ok.bin")]), &dir, 4).is_ok());
        assert!(inline(&model(&[("offset", "0")]), &dir, 4)
            .unwrap_err()
            .contains("no location"));
    }

    #[test]
    fn keys_that_protobuf_would_read_as_another_field_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // graph (7) as a 5-byte key with bits past 32 (protobuf keeps 32
        // bits: field 7 there, field 2^30+7 here), then as a 6-byte key
        let graph = model(&[("location", "w.bin")]);
        let body = &graph[1..]; // the graph's length and message
        let mut past_32 = Vec::new();
        put_varint(&mut past_32, (1u64 << 33) | (7 << 3 | 2));
        past_32.extend_from_slice(body);
        let e = inline(&past_32, dir.path(), 1 << 20).unwrap_err();
        assert!(e.contains("field key of 5 bytes"), "{e}");
        let mut six = vec![0xba, 0x80, 0x80, 0x80, 0x80, 0x00];
        six.extend_from_slice(body);
        let e = inline(&six, dir.path(), 1 << 20).unwrap_err();
        assert!(e.contains("field key of 6 bytes"), "{e}");
        // a non-minimal key within 5 bytes names the same field both ways
        let mut padded = vec![0xba, 0x80, 0x00];
        padded.extend_from_slice(body);
        let e = inline(&padded, dir.path(), 1 << 20).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn data_location_is_read_as_onnx_runtime_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.bin"), b"0123").unwrap();
        // a tensor with data_location `value` (as a varint) and location w.bin
        let tensor = |value: &[u8]| {
            let mut t = [field(8, b"w"), entry("location", "w.bin")].concat();
            t.push(14 << 3);
            t.extend_from_slice(value);
            field(7, &field(5, &t))
        };
        // 2^32 + 1, which a 32-bit enum reads as 1 (EXTERNAL): inlined
        let mut wide = Vec::new();
        put_varint(&mut wide, (1u64 << 32) + 1);
        let (out, files) = inline(&tensor(&wide), dir.path(), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(files.len(), 1);
        assert!(out.windows(4).any(|w| w == b"0123"));
        // 0 and 2^32 (DEFAULT): left alone
        let mut zero = Vec::new();
        put_varint(&mut zero, 1u64 << 32);
        assert!(inline(&tensor(&zero), dir.path(), 1 << 20)
            .unwrap()
            .is_none());
        // any other value, or another wire type: refused
        assert!(inline(&tensor(&[2]), dir.path(), 1 << 20)
            .unwrap_err()
            .contains("neither"));
        let mut packed = [field(8, b"w"), entry("location", "w.bin")].concat();
        packed.extend(field(14, &[1]));
        let m = field(7, &field(5, &packed));
        assert!(inline(&m, dir.path(), 1 << 20)
            .unwrap_err()
            .contains("wire type"));
    }

    #[test]
    fn malformed_protobuf_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &[0x3a, 0xff][..],
            &[0x3a, 0x05, 1],
            &[0x00],
            &[0x0b],
            &[0xff; 11],
        ] {
            assert!(inline(bad, dir.path(), 10).is_err(), "{bad:?}");
        }
    }
}
