//! numpy arrays, dtypes and scalars as they appear in a pickle, rebuilt from
//! the bytes the pickle carries (never through numpy):
//!
//! - protocol 2 to 4: `numpy._core.multiarray._reconstruct(ndarray, (0,), b'b')`
//!   then BUILD with `(version, shape, dtype, is_fortran, data)`, where `data`
//!   is bytes (protocol 2 writes them as `_codecs.encode(text, 'latin1')`) or,
//!   for object arrays, a list;
//! - protocol 5: `numpy._core.numeric._frombuffer(buffer, dtype, shape, order)`;
//! - dtypes: `numpy.dtype(spec, False, True)` then BUILD with
//!   `(3, byteorder, subarray, names, fields, itemsize, alignment, flags)`;
//! - scalars: `numpy._core.multiarray.scalar(dtype, bytes)`.
//!
//! `numpy.core` (numpy 1.x) and `numpy._core` (2.x) are both accepted.

use super::reader::{kind_name, Graph, Id, Obj};

/// How deep the object walks here may go.
pub const MAX_DEPTH: usize = 64;

/// One numeric or structured element type.
#[derive(Debug, Clone, PartialEq)]
pub struct Dtype {
    /// `f`, `i`, `u`, `b` (bool), `V` (structured / void), `O` (object).
    pub kind: char,
    pub size: usize,
    pub little: bool,
    /// Structured: `(name, dtype, offset)` in `names` order.
    pub fields: Vec<(String, Dtype, usize)>,
}

/// An array's shape, element type and raw data.
#[derive(Debug, Clone)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    /// C-order bytes (fortran-order arrays are transposed on read).
    pub data: Vec<u8>,
    /// Object arrays: the elements.
    pub objects: Vec<Id>,
}

fn is_numpy(module: &str, names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| module == format!("numpy.core.{n}") || module == format!("numpy._core.{n}"))
}

/// `module.name` of a global node.
pub fn global_name(g: &Graph, id: Id) -> Option<(&str, &str)> {
    match g.get(id) {
        Obj::Global { module, name } => Some((module, name)),
        _ => None,
    }
}

/// The items of a tuple or list.
pub fn seq(g: &Graph, id: Id) -> Result<&[Id], String> {
    match g.get(id) {
        Obj::Tuple(v) | Obj::List(v) => Ok(v),
        o => Err(format!("expected a tuple or list, found {}", kind_name(o))),
    }
}

/// Bytes, from a bytes node, a `_codecs.encode(text, 'latin1')` call
/// (protocol 2) or an out-of-band buffer.
pub fn bytes_of(g: &Graph, id: Id) -> Result<Vec<u8>, String> {
    match g.get(id) {
        Obj::Bytes(b) => Ok(b.clone()),
        Obj::Buffer(i) => Ok(g.buffers[*i].clone()),
        Obj::Call {
            func,
            args,
            state: None,
            ..
        } if global_name(g, *func) == Some(("_codecs", "encode")) => {
            let a = seq(g, *args)?;
            match (a.first().map(|&i| g.get(i)), a.get(1).map(|&i| g.get(i))) {
                (Some(Obj::Str(s)), Some(Obj::Str(enc))) if enc == "latin1" || enc == "latin-1" => {
                    s.chars()
                        .map(|c| {
                            u8::try_from(c as u32)
                                .map_err(|_| "a latin1 string above U+00FF".to_string())
                        })
                        .collect()
                }
                _ => Err("_codecs.encode with arguments other than (text, 'latin1')".into()),
            }
        }
        Obj::Call { func, args, .. }
            if global_name(g, *func) == Some(("builtins", "bytearray")) =>
        {
            let a = seq(g, *args)?;
            match a.first() {
                Some(&b) => bytes_of(g, b),
                None => Ok(Vec::new()),
            }
        }
        o => Err(format!("expected bytes, found {}", kind_name(o))),
    }
}

/// A dtype node.
pub fn dtype(g: &Graph, id: Id, depth: usize) -> Result<Dtype, String> {
    if depth > MAX_DEPTH {
        return Err("dtype nested too deeply".into());
    }
    let Obj::Call {
        func, args, state, ..
    } = g.get(id)
    else {
        return Err(format!(
            "expected a numpy dtype, found {}",
            kind_name(g.get(id))
        ));
    };
    if global_name(g, *func) != Some(("numpy", "dtype")) {
        return Err("expected numpy.dtype".into());
    }
    let spec = match seq(g, *args)?.first().map(|&i| g.get(i)) {
        Some(Obj::Str(s)) => s.clone(),
        _ => return Err("numpy.dtype without a type string".into()),
    };
    let mut chars = spec.chars();
    let kind = chars.next().ok_or("empty dtype string")?;
    let size: usize = chars
        .as_str()
        .parse()
        .map_err(|_| format!("dtype '{spec}'"))?;
    let mut d = Dtype {
        kind,
        size,
        little: true,
        fields: Vec::new(),
    };
    let numeric_size = matches!(size, 1 | 2 | 4 | 8);
    match kind {
        'f' if size == 4 || size == 8 => {}
        'i' | 'u' | 'b' if numeric_size => {}
        'O' if size == 8 => {}
        'V' if (1..=1 << 20).contains(&size) => {}
        _ => return Err(format!("unsupported dtype '{spec}'")),
    }
    if let Some(st) = state {
        let st = seq(g, *st)?;
        if let Some(Obj::Str(order)) = st.get(1).map(|&i| g.get(i)) {
            d.little = order != ">";
        }
        if kind == 'V' {
            let names = st.get(3).ok_or("structured dtype without names")?;
            let fields = st.get(4).ok_or("structured dtype without fields")?;
            let Obj::Dict(fields) = g.get(*fields) else {
                return Err("structured dtype fields are not a dict".into());
            };
            for &n in seq(g, *names)? {
                let Obj::Str(name) = g.get(n) else {
                    return Err("a field name is not a string".into());
                };
                let (_, spec) = fields
                    .iter()
                    .find(|(k, _)| g.get(*k) == &Obj::Str(name.clone()))
                    .ok_or_else(|| format!("field '{name}' has no entry"))?;
                let spec = seq(g, *spec)?;
                let (Some(&ft), Some(&off)) = (spec.first(), spec.get(1)) else {
                    return Err(format!("field '{name}' is malformed"));
                };
                let Obj::Int(off) = g.get(off) else {
                    return Err(format!("field '{name}' has no offset"));
                };
                let ft = dtype(g, ft, depth + 1)?;
                let off = usize::try_from(*off).map_err(|_| "negative field offset".to_string())?;
                if off.checked_add(ft.size).is_none_or(|end| end > size) {
                    return Err(format!(
                        "field '{name}' lies outside its {size}-byte record"
                    ));
                }
                d.fields.push((name.clone(), ft, off));
            }
        }
    }
    Ok(d)
}

/// Reads one element of a numeric dtype from `b` as `f64`.
fn num(d: &Dtype, b: &[u8]) -> Result<f64, String> {
    let mut a = [0u8; 8];
    a[..d.size].copy_from_slice(&b[..d.size]);
    if !d.little {
        a[..d.size].reverse();
    }
    Ok(match (d.kind, d.size) {
        ('f', 8) => f64::from_le_bytes(a),
        ('f', 4) => f32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
        ('i', 8) => i64::from_le_bytes(a) as f64,
        ('i', 4) => i32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
        ('i', 2) => i16::from_le_bytes([a[0], a[1]]) as f64,
        ('i', 1) => a[0] as i8 as f64,
        ('u', 8) => u64::from_le_bytes(a) as f64,
        ('u', 4) => u32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
        ('u', 2) => u16::from_le_bytes([a[0], a[1]]) as f64,
        ('u', 1) | ('b', 1) => a[0] as f64,
        (k, s) => return Err(format!("unsupported numeric dtype {k}{s}")),
    })
}

impl NdArray {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as `f64`, C order.
    pub fn f64s(&self) -> Result<Vec<f64>, String> {
        if self.dtype.kind == 'O' || self.dtype.kind == 'V' {
            return Err(format!(
                "expected a numeric array, found dtype {}",
                self.dtype.kind
            ));
        }
        self.data
            .chunks_exact(self.dtype.size)
            .map(|c| num(&self.dtype, c))
            .collect()
    }

    /// One field of a structured array as `f64`, per record.
    pub fn field(&self, name: &str) -> Result<Vec<f64>, String> {
        let (_, ft, off) = self
            .dtype
            .fields
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| format!("the array has no field '{name}'"))?;
        self.data
            .chunks_exact(self.dtype.size)
            .map(|rec| num(ft, &rec[*off..]))
            .collect()
    }
}

fn shape_of(g: &Graph, id: Id) -> Result<Vec<usize>, String> {
    match g.get(id) {
        Obj::Int(n) => Ok(vec![usize::try_from(*n).map_err(|_| "negative dimension")?]),
        _ => seq(g, id)?
            .iter()
            .map(|&d| match g.get(d) {
                Obj::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err("a dimension is not a non-negative int".to_string()),
            })
            .collect(),
    }
}

/// Whether `id` is an ndarray node.
pub fn is_array(g: &Graph, id: Id) -> bool {
    match g.get(id) {
        Obj::Call { func, .. } => global_name(g, *func).is_some_and(|(m, n)| {
            (n == "_reconstruct" && is_numpy(m, &["multiarray"]))
                || (n == "_frombuffer" && is_numpy(m, &["numeric"]))
        }),
        _ => false,
    }
}

/// An ndarray node.
pub fn array(g: &Graph, id: Id) -> Result<NdArray, String> {
    let Obj::Call {
        func, args, state, ..
    } = g.get(id)
    else {
        return Err(format!(
            "expected a numpy array, found {}",
            kind_name(g.get(id))
        ));
    };
    let (module, name) = global_name(g, *func).ok_or("expected a numpy array")?;
    let args = seq(g, *args)?;
    let (shape, dt, raw, fortran, objects) =
        if name == "_frombuffer" && is_numpy(module, &["numeric"]) {
            let [buf, dt, shape, order] = args else {
                return Err("_frombuffer with other than 4 arguments".into());
            };
            let fortran = g.get(*order) == &Obj::Str("F".into());
            (
                shape_of(g, *shape)?,
                dtype(g, *dt, 0)?,
                bytes_of(g, *buf)?,
                fortran,
                Vec::new(),
            )
        } else if name == "_reconstruct" && is_numpy(module, &["multiarray"]) {
            let st = state.ok_or("an ndarray without its state")?;
            let st = seq(g, st)?;
            let [_, shape, dt, fortran, data] = st else {
                return Err("ndarray state is not (version, shape, dtype, fortran, data)".into());
            };
            let dt = dtype(g, *dt, 0)?;
            let fortran = g.get(*fortran) == &Obj::Bool(true);
            if dt.kind == 'O' {
                let objects = seq(g, *data)?.to_vec();
                (shape_of(g, *shape)?, dt, Vec::new(), fortran, objects)
            } else {
                (
                    shape_of(g, *shape)?,
                    dt,
                    bytes_of(g, *data)?,
                    fortran,
                    Vec::new(),
                )
            }
        } else {
            return Err(format!("expected a numpy array, found {module}.{name}"));
        };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("array shape overflows")?;
    if dt.kind == 'O' {
        if objects.len() != n {
            return Err(format!(
                "object array of shape {shape:?} holds {} items",
                objects.len()
            ));
        }
    } else if n.checked_mul(dt.size) != Some(raw.len()) {
        return Err(format!(
            "array of shape {shape:?} and {}-byte items has {} bytes of data",
            dt.size,
            raw.len()
        ));
    }
    let mut a = NdArray {
        shape,
        dtype: dt,
        data: raw,
        objects,
    };
    if fortran && a.shape.len() == 2 {
        // to C order
        let (r, c) = (a.shape[0], a.shape[1]);
        if a.dtype.kind == 'O' {
            let mut o = Vec::with_capacity(n);
            for i in 0..r {
                for j in 0..c {
                    o.push(a.objects[j * r + i]);
                }
            }
            a.objects = o;
        } else {
            let s = a.dtype.size;
            let mut d = Vec::with_capacity(a.data.len());
            for i in 0..r {
                for j in 0..c {
                    d.extend_from_slice(&a.data[(j * r + i) * s..(j * r + i + 1) * s]);
                }
            }
            a.data = d;
        }
    } else if fortran && a.shape.len() > 2 {
        return Err("fortran-order arrays of more than 2 dimensions are not supported".into());
    }
    Ok(a)
}

/// A number: an int, float, bool or numpy scalar.
pub fn number(g: &Graph, id: Id) -> Result<f64, String> {
    match g.get(id) {
        Obj::Int(v) => Ok(*v as f64),
        Obj::Float(v) => Ok(*v),
        Obj::Bool(b) => Ok(*b as u8 as f64),
        Obj::Call { func, args, .. }
            if global_name(g, *func)
                .is_some_and(|(m, n)| n == "scalar" && is_numpy(m, &["multiarray"])) =>
        {
            let a = seq(g, *args)?;
            let (Some(&dt), Some(&b)) = (a.first(), a.get(1)) else {
                return Err("numpy scalar without dtype and bytes".into());
            };
            let dt = dtype(g, dt, 0)?;
            let b = bytes_of(g, b)?;
            if b.len() != dt.size {
                return Err("numpy scalar of the wrong size".into());
            }
            num(&dt, &b)
        }
        o => Err(format!("expected a number, found {}", kind_name(o))),
    }
}
