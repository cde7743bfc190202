//! A bounded Universal Binary JSON (UBJSON) reader, as XGBoost writes `.ubj`
//! models: big-endian numbers, optimised containers (`$` type, `#` count),
//! object keys without the `S` marker. Decodes into `serde_json::Value` so the
//! JSON and UBJSON model paths share one reader.

use serde_json::{Map, Number, Value};

/// Deepest nesting accepted (XGBoost models use about 8 levels).
const MAX_DEPTH: usize = 128;

/// Decodes a document of at most `max_values` values (every scalar, string
/// and container counts one). The count is what bounds memory: a typed
/// container of a zero-byte type (`[$Z#L...`, `$T`, `$F`) declares values
/// that take no bytes at all, so no check against the input length can.
pub fn decode(bytes: &[u8], max_values: usize) -> Result<Value, String> {
    let mut r = Reader {
        b: bytes,
        pos: 0,
        budget: max_values,
        max_values,
    };
    let v = r.value(0)?;
    if r.pos != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the document",
            bytes.len() - r.pos
        ));
    }
    Ok(v)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    /// Values that may still be decoded.
    budget: usize,
    max_values: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.b.len() - self.pos < n {
            return Err(format!(
                "unexpected end of data at byte {} (wanted {n} more)",
                self.pos
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn int_of(&mut self, marker: u8) -> Result<i64, String> {
        Ok(match marker {
            b'i' => self.byte()? as i8 as i64,
            b'U' => self.byte()? as i64,
            b'I' => i16::from_be_bytes(self.take(2)?.try_into().unwrap_or_default()) as i64,
            b'l' => i32::from_be_bytes(self.take(4)?.try_into().unwrap_or_default()) as i64,
            b'L' => i64::from_be_bytes(self.take(8)?.try_into().unwrap_or_default()),
            m => {
                return Err(format!(
                    "expected an integer marker, found {:?} at byte {}",
                    m as char,
                    self.pos - 1
                ))
            }
        })
    }

    /// A non-negative length that cannot exceed what is left of the input.
    fn length(&mut self, min_item_size: usize) -> Result<usize, String> {
        let m = self.byte()?;
        let n = self.int_of(m)?;
        let left = self.b.len() - self.pos;
        if n < 0 || (n as u64).saturating_mul(min_item_size.max(1) as u64) > left as u64 {
            return Err(format!(
                "declared length {n} at byte {} exceeds the data",
                self.pos
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.length(1)?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| format!("invalid UTF-8 string before byte {}", self.pos))
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        let mut m = self.byte()?;
        while m == b'N' {
            // no-op padding
            m = self.byte()?;
        }
        self.typed(m, depth)
    }

    fn typed(&mut self, m: u8, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        if self.budget == 0 {
            return Err(format!(
                "the document has more than {} values (at byte {})",
                self.max_values, self.pos
            ));
        }
        self.budget -= 1;
        Ok(match m {
            b'Z' => Value::Null,
            b'T' => Value::Bool(true),
            b'F' => Value::Bool(false),
            b'i' | b'U' | b'I' | b'l' | b'L' => Value::Number(self.int_of(m)?.into()),
            b'd' => float(f32::from_be_bytes(self.take(4)?.try_into().unwrap_or_default()) as f64),
            b'D' => float(f64::from_be_bytes(
                self.take(8)?.try_into().unwrap_or_default(),
            )),
            b'H' => {
                let s = self.string()?;
                serde_json::from_str::<Number>(&s)
                    .map(Value::Number)
                    .map_err(|_| format!("bad high-precision number '{s}'"))?
            }
            b'C' => Value::String((self.byte()? as char).to_string()),
            b'S' => Value::String(self.string()?),
            b'[' => self.array(depth)?,
            b'{' => self.object(depth)?,
            m => {
                return Err(format!(
                    "unknown type marker {:?} at byte {}",
                    m as char,
                    self.pos - 1
                ))
            }
        })
    }

    /// Optional `$type` and `#count` after a container's opening marker.
    fn container_header(&mut self) -> Result<(Option<u8>, Option<usize>), String> {
        let mut ty = None;
        if self.peek() == Some(b'$') {
            self.pos += 1;
            ty = Some(self.byte()?);
            if self.peek() != Some(b'#') {
                return Err("a typed container must have a count".into());
            }
        }
        let mut count = None;
        if self.peek() == Some(b'#') {
            self.pos += 1;
            let size = match ty {
                Some(b'D') | Some(b'L') => 8,
                Some(b'd') | Some(b'l') => 4,
                Some(b'I') => 2,
                Some(b'Z') | Some(b'T') | Some(b'F') | Some(b'N') => 0,
                _ => 1,
            };
            count = Some(self.length(size)?);
        }
        Ok((ty, count))
    }

    fn array(&mut self, depth: usize) -> Result<Value, String> {
        let (ty, count) = self.container_header()?;
        let mut out = Vec::with_capacity(count.unwrap_or(0).min(1 << 20));
        match count {
            Some(n) => {
                for _ in 0..n {
                    out.push(match ty {
                        Some(t) => self.typed(t, depth + 1)?,
                        None => self.value(depth + 1)?,
                    });
                }
            }
            None => loop {
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    break;
                }
                out.push(self.value(depth + 1)?);
            },
        }
        Ok(Value::Array(out))
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        let (ty, count) = self.container_header()?;
        let mut out = Map::new();
        let mut item = |r: &mut Self| -> Result<(), String> {
            let k = r.string()?;
            let v = match ty {
                Some(t) => r.typed(t, depth + 1)?,
                None => r.value(depth + 1)?,
            };
            out.insert(k, v);
            Ok(())
        };
        match count {
            Some(n) => {
                for _ in 0..n {
                    item(self)?;
                }
            }
            None => loop {
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    break;
                }
                item(self)?;
            },
        }
        Ok(Value::Object(out))
    }
}

fn float(v: f64) -> Value {
    Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_objects_and_typed_arrays() {
        // {"a": [$d#i2 1.5 -2.0], "b": "x"}
        let mut b = vec![b'{', b'i', 1, b'a', b'[', b'$', b'd', b'#', b'i', 2];
        b.extend_from_slice(&1.5f32.to_be_bytes());
        b.extend_from_slice(&(-2.0f32).to_be_bytes());
        b.extend_from_slice(&[b'i', 1, b'b', b'S', b'i', 1, b'x', b'}']);
        let v = decode(&b, 1 << 20).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1.5, -2.0], "b": "x"}));
    }

    #[test]
    fn huge_declared_length_is_refused_without_allocating() {
        let b = [
            b'[', b'$', b'd', b'#', b'L', 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode(&b, 1 << 20).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn no_op_padding_is_skipped_without_recursion() {
        let mut b = vec![b'N'; 1_000_000];
        b.push(b'Z');
        assert_eq!(decode(&b, 1 << 20).unwrap(), Value::Null);
    }

    #[test]
    fn zero_byte_typed_containers_count_against_the_value_budget() {
        // an array of 5,000 arrays of nulls (or trues, falses), each in 6
        // bytes and declaring as many values as bytes remain after it (the
        // most a length check against the input allows): 75 million values
        // from 30 KB
        for ty in [b'Z', b'T', b'F'] {
            let n = 5000usize;
            let mut b = vec![b'[', b'$', b'[', b'#', b'I'];
            b.extend_from_slice(&(n as u16).to_be_bytes());
            for i in 0..n {
                b.extend_from_slice(&[b'$', ty, b'#', b'I']);
                b.extend_from_slice(&(((n - 1 - i) * 6) as u16).to_be_bytes());
            }
            assert!(b.len() < 31_000);
            let e = decode(&b, 1_000_000).unwrap_err();
            assert!(e.contains("more than 1000000 values"), "{e}");
        }
        // within the budget it decodes
        let b = *b"[[$Z#i\x02ZZ]";
        let want = serde_json::json!([[null, null], null, null]);
        assert_eq!(decode(&b, 6).unwrap(), want);
        assert!(decode(&b, 5).is_err(), "the arrays themselves count");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let b = vec![b'['; 10_000];
        assert!(decode(&b, 1 << 20).unwrap_err().contains("nesting"));
    }

    #[test]
    fn truncation_is_reported() {
        let e = decode(&[b'{', b'i', 1, b'a', b'l', 0, 0], 1 << 20).unwrap_err();
        assert!(e.contains("end of data"), "{e}");
    }
}
