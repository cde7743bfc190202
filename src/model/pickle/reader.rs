//! A pickle reader that never executes anything.
//!
//! Python's unpickler calls whatever the file names (`GLOBAL` imports it,
//! `REDUCE` calls it, `BUILD` runs `__setstate__`). This reader interprets
//! the opcodes (protocols 2 to 5) as data instead: it builds a graph of
//! [`Obj`] nodes in which a global is just its module and name, `REDUCE` and
//! `NEWOBJ` are "this callable with these arguments" nodes, and `BUILD`
//! attaches the state to its object. Nothing is imported, called or
//! resolved; what the graph means is decided afterwards, by an allowlist.
//!
//! Nodes live in one arena and are referred to by index, so the memo (`PUT`/
//! `GET`) shares a node instead of copying it, and `APPENDS`/`SETITEMS`/`BUILD`
//! on a memoised object are seen through every reference, as in Python. The
//! graph may contain cycles; readers of it bound their depth.
//!
//! Hostile input: every length is checked against the bytes that remain
//! before anything is allocated; the arena, the stack, the memo and the
//! input size are bounded; opcodes that need an external resolver
//! (persistent ids, the extension registry, out-of-band buffers not given)
//! are refused. Errors name the opcode and its byte offset.

use std::collections::{HashMap, HashSet};

/// Index of a node in [`Graph::nodes`].
pub type Id = u32;

/// Limits for hostile input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted input.
    pub max_bytes: usize,
    /// Most nodes the graph may hold.
    pub max_nodes: usize,
    /// Deepest stack (values plus marks).
    pub max_stack: usize,
    /// Most memo entries.
    pub max_memo: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 31,
            max_nodes: 20_000_000,
            max_stack: 1_000_000,
            max_memo: 10_000_000,
        }
    }
}

/// One value of the pickle, as data.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for `i64`: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// `module.name`, named by the file; never imported.
    Global {
        module: String,
        name: String,
    },
    /// `func(*args)` (REDUCE) or `cls.__new__(cls, *args, **kwargs)`
    /// (NEWOBJ, NEWOBJ_EX), never called; `state` is what BUILD gave it.
    Call {
        func: Id,
        args: Id,
        kwargs: Option<Id>,
        newobj: bool,
        state: Option<Id>,
    },
    /// An out-of-band buffer (protocol 5), by index into the buffers given.
    Buffer(usize),
}

/// Why a pickle could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("pickle byte {offset}: {reason}")]
pub struct ReadError {
    pub offset: usize,
    pub reason: String,
}

/// The decoded pickle: its nodes, the root and every global it names.
#[derive(Debug, Default)]
pub struct Graph {
    pub nodes: Vec<Obj>,
    pub root: Id,
    /// `(module, name)` of every global, in order of first appearance.
    pub globals: Vec<(String, String)>,
    /// Out-of-band buffers given to [`read_with_buffers`].
    pub buffers: Vec<Vec<u8>>,
    /// Bytes of the pickle the graph was read from (what bounds what may be
    /// built from it: a memo reference costs two bytes however large the
    /// object it repeats).
    pub input_len: usize,
}

impl Graph {
    pub fn get(&self, id: Id) -> &Obj {
        &self.nodes[id as usize]
    }
}

/// Reads a pickle (protocols 2 to 5) into a [`Graph`] with default limits.
pub fn read(data: &[u8]) -> Result<Graph, ReadError> {
    read_with_buffers(data, Vec::new(), Limits::default())
}

/// Reads a pickle whose protocol-5 out-of-band buffers are given separately.
pub fn read_with_buffers(
    data: &[u8],
    buffers: Vec<Vec<u8>>,
    limits: Limits,
) -> Result<Graph, ReadError> {
    if data.len() > limits.max_bytes {
        return Err(ReadError {
            offset: 0,
            reason: format!(
                "{} bytes is more than the {} a pickle may have",
                data.len(),
                limits.max_bytes
            ),
        });
    }
    if let Some(codec) = compression(data) {
        return Err(ReadError {
            offset: 0,
            reason: format!(
                "a compressed file ({codec}; joblib.dump with compress=): compressed pickles are not read; \
                 save it with joblib.dump(model, path) without compress, or pickle.dump"
            ),
        });
    }
    if data.first() != Some(&0x80) {
        return Err(ReadError {
            offset: 0,
            reason:
                "not a pickle of protocol 2 or later (it does not start with the PROTO opcode 0x80)"
                    .into(),
        });
    }
    let mut r = Reader {
        data,
        pos: 0,
        op_at: 0,
        graph: Graph {
            buffers,
            input_len: data.len(),
            ..Graph::default()
        },
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        limits,
        next_buffer: 0,
        nesting: 0,
        seen_globals: HashSet::new(),
    };
    r.graph.root = r.run()?;
    Ok(r.graph)
}

/// The compression a file starts with (joblib's compressors), if any.
fn compression(data: &[u8]) -> Option<&'static str> {
    Some(match data {
        [0x78, 0x01 | 0x5e | 0x9c | 0xda, ..] => "zlib",
        [0x1f, 0x8b, ..] => "gzip",
        [b'B', b'Z', b'h', ..] => "bz2",
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => "xz",
        [0x5d, 0x00, 0x00, ..] => "lzma",
        [0x04, 0x22, 0x4d, 0x18, ..] => "lz4",
        [b'Z', b'F', ..] => "zlib (joblib's older format)",
        _ => return None,
    })
}

/// An entry of the value stack: a node or a MARK.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Val(Id),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run (for errors).
    op_at: usize,
    graph: Graph,
    stack: Vec<Slot>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    limits: Limits,
    next_buffer: usize,
    /// Depth of nested pickle streams (joblib object arrays).
    nesting: usize,
    /// The globals already listed in `graph.globals`.
    seen_globals: HashSet<(String, String)>,
}

impl Reader<'_> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, ReadError> {
        Err(ReadError {
            offset: self.op_at,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], ReadError> {
        if n > self.data.len() - self.pos {
            return self.err(format!(
                "truncated: needs {n} bytes, {} remain",
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ReadError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ReadError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ReadError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length read from the file, checked against what remains.
    fn len(&mut self, n: u64) -> Result<usize, ReadError> {
        let remain = (self.data.len() - self.pos) as u64;
        if n > remain {
            return self.err(format!(
                "declared length {n} is more than the {remain} bytes that remain"
            ));
        }
        Ok(n as usize)
    }

    /// A text line (GLOBAL, PUT/GET text forms), without its newline.
    fn line(&mut self) -> Result<&str, ReadError> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("truncated: a text argument has no newline");
        };
        self.pos += end + 1;
        match std::str::from_utf8(&rest[..end]) {
            Ok(s) => Ok(s),
            Err(_) => self.err("a text argument is not UTF-8"),
        }
    }

    fn node(&mut self, o: Obj) -> Result<Id, ReadError> {
        if self.graph.nodes.len() >= self.limits.max_nodes {
            return self.err(format!("more than {} objects", self.limits.max_nodes));
        }
        self.graph.nodes.push(o);
        Ok((self.graph.nodes.len() - 1) as Id)
    }

    fn push(&mut self, id: Id) -> Result<(), ReadError> {
        if self.stack.len() + self.marks.len() >= self.limits.max_stack {
            return self.err(format!("stack deeper than {}", self.limits.max_stack));
        }
        self.stack.push(Slot::Val(id));
        Ok(())
    }

    fn push_new(&mut self, o: Obj) -> Result<(), ReadError> {
        let id = self.node(o)?;
        self.push(id)
    }

    fn pop(&mut self) -> Result<Id, ReadError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("pops past a MARK");
        }
        match self.stack.pop() {
            Some(Slot::Val(id)) => Ok(id),
            None => self.err("pops an empty stack"),
        }
    }

    fn top(&self) -> Result<Id, ReadError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("reads past a MARK");
        }
        match self.stack.last() {
            Some(Slot::Val(id)) => Ok(*id),
            None => self.err("reads an empty stack"),
        }
    }

    /// Everything above the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Id>, ReadError> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK to pop to");
        };
        Ok(self.stack.drain(m..).map(|Slot::Val(id)| id).collect())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), ReadError> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return self.err(format!("more than {} memo entries", self.limits.max_memo));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), ReadError> {
        match self.memo.get(&key) {
            Some(&id) => self.push(id),
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    fn global(&mut self, module: String, name: String) -> Result<(), ReadError> {
        if self.seen_globals.insert((module.clone(), name.clone())) {
            self.graph.globals.push((module.clone(), name.clone()));
        }
        self.push_new(Obj::Global { module, name })
    }

    fn string(&mut self, n: usize) -> Result<(), ReadError> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => {
                let s = s.to_string();
                self.push_new(Obj::Str(s))
            }
            Err(_) => self.err("a string is not valid UTF-8"),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<(), ReadError> {
        let b = self.take(n)?.to_vec();
        self.push_new(Obj::Bytes(b))
    }

    fn long(&mut self, n: usize) -> Result<(), ReadError> {
        let b = self.take(n)?.to_vec();
        let o = if b.is_empty() {
            Obj::Int(0)
        } else if b.len() <= 8 {
            let neg = b[b.len() - 1] & 0x80 != 0;
            let mut a = [if neg { 0xff } else { 0 }; 8];
            a[..b.len()].copy_from_slice(&b);
            Obj::Int(i64::from_le_bytes(a))
        } else {
            Obj::BigInt(b)
        };
        self.push_new(o)
    }

    /// Runs opcodes until STOP.
    fn run(&mut self) -> Result<Id, ReadError> {
        loop {
            self.op_at = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&op) => op,
                None => return self.err("truncated: no STOP opcode"),
            };
            self.pos += 1;
            match op {
                0x80 => {
                    // PROTO
                    let v = self.u8()?;
                    if v > 5 {
                        return self.err(format!("unsupported pickle protocol {v}"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    let n = self.u64()?;
                    self.len(n)?;
                }
                b'.' => {
                    // STOP
                    return self.pop();
                }
                b'N' => self.push_new(Obj::None)?,
                0x88 => self.push_new(Obj::Bool(true))?,
                0x89 => self.push_new(Obj::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push_new(Obj::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_new(Obj::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push_new(Obj::Int(v as i64))?
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as u64;
                    let n = self.len(n)?;
                    self.long(n)?
                }
                0x8b => {
                    // LONG4
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return self.err("LONG4 with a negative length");
                    }
                    let n = self.len(n as u64)?;
                    self.long(n)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push_new(Obj::Float(f64::from_be_bytes(a)))?
                }
                b'I' | b'L' | b'F' => {
                    // text INT / LONG / FLOAT (protocol 0, still seen for bools)
                    let text = self.line()?.trim_end_matches('L').to_string();
                    let o = match (op, text.as_str()) {
                        (b'I', "00") => Obj::Bool(false),
                        (b'I', "01") => Obj::Bool(true),
                        (b'F', t) => match t.parse::<f64>() {
                            Ok(v) => Obj::Float(v),
                            Err(_) => return self.err(format!("bad FLOAT text '{t}'")),
                        },
                        (_, t) => match t.parse::<i64>() {
                            Ok(v) => Obj::Int(v),
                            Err(_) => return self.err(format!("bad integer text '{t}'")),
                        },
                    };
                    self.push_new(o)?
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    self.string(n)?
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let n = self.len(n)?;
                    self.string(n)?
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    self.string(n)?
                }
                b'T' => {
                    // BINSTRING (a Python 2 str): kept as bytes
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return self.err("BINSTRING with a negative length");
                    }
                    let n = self.len(n as u64)?;
                    self.bytes(n)?
                }
                b'U' | b'C' => {
                    let n = self.u8()? as u64;
                    let n = self.len(n)?;
                    self.bytes(n)?
                }
                b'B' => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    self.bytes(n)?
                }
                0x8e | 0x96 => {
                    // BINBYTES8, BYTEARRAY8
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    self.bytes(n)?
                }
                0x97 => {
                    // NEXT_BUFFER
                    let i = self.next_buffer;
                    if i >= self.graph.buffers.len() {
                        return self.err(format!(
                            "uses out-of-band buffer #{i} (pickled with a buffer_callback), which a single file does not carry"
                        ));
                    }
                    self.next_buffer += 1;
                    self.push_new(Obj::Buffer(i))?
                }
                0x98 => {
                    // READONLY_BUFFER: no-op on data
                    self.top()?;
                }
                b']' => self.push_new(Obj::List(Vec::new()))?,
                b'}' => self.push_new(Obj::Dict(Vec::new()))?,
                b')' => self.push_new(Obj::Tuple(Vec::new()))?,
                0x8f => self.push_new(Obj::Set(Vec::new()))?,
                b'(' => {
                    if self.stack.len() + self.marks.len() >= self.limits.max_stack {
                        return self.err(format!("stack deeper than {}", self.limits.max_stack));
                    }
                    self.marks.push(self.stack.len())
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::List(items))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Tuple(items))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_new(Obj::Dict(pairs))?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Set(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_new(Obj::Tuple(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.extend(list, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.extend(list, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let d = self.top()?;
                    self.set_items(d, pairs)?
                }
                0x90 => {
                    // ADDITEMS
                    let items = self.pop_mark()?;
                    let s = self.top()?;
                    match &mut self.graph.nodes[s as usize] {
                        Obj::Set(v) => v.extend(items),
                        _ => return self.err("ADDITEMS on something that is not a set"),
                    }
                }
                b'0' => {
                    // POP (a MARK on top is popped too)
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.push(id)?
                }
                b'p' => {
                    let key = self.line()?.trim().to_string();
                    match key.parse::<u32>() {
                        Ok(k) => self.memo_put(k)?,
                        Err(_) => return self.err(format!("bad PUT key '{key}'")),
                    }
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    // MEMOIZE
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'g' => {
                    let key = self.line()?.trim().to_string();
                    match key.parse::<u32>() {
                        Ok(k) => self.memo_get(k)?,
                        Err(_) => return self.err(format!("bad GET key '{key}'")),
                    }
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.global(module, name)?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.graph.get(module).clone(), self.graph.get(name).clone()) {
                        (Obj::Str(m), Obj::Str(n)) => self.global(m, n)?,
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.push_new(Obj::Call {
                        func,
                        args,
                        kwargs: None,
                        newobj: false,
                        state: None,
                    })?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.push_new(Obj::Call {
                        func: cls,
                        args,
                        kwargs: None,
                        newobj: true,
                        state: None,
                    })?
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.push_new(Obj::Call {
                        func: cls,
                        args,
                        kwargs: Some(kwargs),
                        newobj: true,
                        state: None,
                    })?
                }
                b'b' => {
                    let st = self.pop()?;
                    let obj = self.top()?;
                    if self.is_joblib_wrapper(obj) {
                        // joblib.dump: the array's bytes follow in the file
                        let array = self.joblib_array(st)?;
                        self.stack.pop();
                        self.push(array)?;
                        continue;
                    }
                    match &mut self.graph.nodes[obj as usize] {
                        Obj::Call { state, .. } => *state = Some(st),
                        other => {
                            let kind = kind_name(other);
                            return self.err(format!("BUILD on {kind}"));
                        }
                    }
                }
                b'P' | b'Q' => {
                    return self.err("persistent ids (PERSID/BINPERSID) need an external resolver")
                }
                0x82..=0x84 => {
                    return self.err("extension-registry codes (EXT1/2/4) need an external resolver")
                }
                b'i' | b'o' => {
                    return self.err("INST/OBJ (protocol 0/1 instance creation) are not supported; re-pickle with protocol 2 or later")
                }
                b'S' | b'V' => {
                    return self.err("text strings (protocol 0) are not supported; re-pickle with protocol 2 or later")
                }
                other => return self.err(format!("unknown opcode 0x{other:02x}")),
            }
        }
    }

    fn is_joblib_wrapper(&self, obj: Id) -> bool {
        let Obj::Call {
            func, newobj: true, ..
        } = self.graph.get(obj)
        else {
            return false;
        };
        matches!(self.graph.get(*func), Obj::Global { module, name }
            if module == "joblib.numpy_pickle" && name == "NumpyArrayWrapper")
    }

    /// The array a joblib `NumpyArrayWrapper` stands for: its bytes follow
    /// the BUILD opcode in the file (after an alignment padding), or, for
    /// object arrays, a nested pickle stream does. Returns an ndarray node.
    fn joblib_array(&mut self, state: Id) -> Result<Id, ReadError> {
        let Obj::Dict(st) = self.graph.get(state).clone() else {
            return self.err("joblib NumpyArrayWrapper state is not a dict");
        };
        let key = |k: &str| {
            st.iter()
                .find(|(n, _)| matches!(self.graph.get(*n), Obj::Str(s) if s == k))
                .map(|(_, v)| *v)
        };
        let (Some(dtype_id), Some(shape_id)) = (key("dtype"), key("shape")) else {
            return self.err("joblib NumpyArrayWrapper without dtype and shape");
        };
        let fortran = key("order").map(|o| self.graph.get(o)) == Some(&Obj::Str("F".into()));
        let dtype = match super::numpy::dtype(&self.graph, dtype_id, 0) {
            Ok(d) => d,
            Err(e) => return self.err(format!("joblib array: {e}")),
        };
        if dtype.kind == 'O' {
            if self.nesting >= 8 {
                return self.err("joblib object arrays nested more than 8 deep");
            }
            // a fresh stack and memo for the nested stream, as joblib reads it
            let saved = (
                std::mem::take(&mut self.stack),
                std::mem::take(&mut self.marks),
                std::mem::take(&mut self.memo),
            );
            self.nesting += 1;
            let inner = self.run();
            self.nesting -= 1;
            (self.stack, self.marks, self.memo) = saved;
            return inner;
        }
        let count = match super::numpy::seq(&self.graph, shape_id) {
            Ok(dims) => dims.iter().try_fold(1u64, |a, &d| match self.graph.get(d) {
                Obj::Int(n) if *n >= 0 => a.checked_mul(*n as u64),
                _ => None,
            }),
            Err(_) => None,
        };
        let Some(count) = count else {
            return self.err("joblib array shape is not a tuple of sizes");
        };
        if key("numpy_array_alignment_bytes").is_some() {
            let pad = self.u8()? as usize;
            self.take(pad)?;
        }
        let Some(n) = count.checked_mul(dtype.size as u64) else {
            return self.err("joblib array size overflows");
        };
        let n = self.len(n)?;
        let data = self.take(n)?.to_vec();
        // the ndarray as pickle would have written it: _reconstruct + state
        let func = self.node(Obj::Global {
            module: "numpy._core.multiarray".into(),
            name: "_reconstruct".into(),
        })?;
        let args = self.node(Obj::Tuple(Vec::new()))?;
        let version = self.node(Obj::Int(1))?;
        let order = self.node(Obj::Bool(fortran))?;
        let bytes = self.node(Obj::Bytes(data))?;
        let st = self.node(Obj::Tuple(vec![version, shape_id, dtype_id, order, bytes]))?;
        self.node(Obj::Call {
            func,
            args,
            kwargs: None,
            newobj: false,
            state: Some(st),
        })
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>, ReadError> {
        if !items.len().is_multiple_of(2) {
            return self.err("an odd number of items for a dict");
        }
        Ok(items.chunks(2).map(|p| (p[0], p[1])).collect())
    }

    fn extend(&mut self, list: Id, items: Vec<Id>) -> Result<(), ReadError> {
        match &mut self.graph.nodes[list as usize] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            other => {
                let kind = kind_name(other);
                self.err(format!("APPEND(S) on {kind}"))
            }
        }
    }

    fn set_items(&mut self, dict: Id, pairs: Vec<(Id, Id)>) -> Result<(), ReadError> {
        match &mut self.graph.nodes[dict as usize] {
            Obj::Dict(v) => {
                v.extend(pairs);
                Ok(())
            }
            other => {
                let kind = kind_name(other);
                self.err(format!("SETITEM(S) on {kind}"))
            }
        }
    }
}

/// A short name for an object's kind, for errors.
pub fn kind_name(o: &Obj) -> &'static str {
    match o {
        Obj::None => "None",
        Obj::Bool(_) => "a bool",
        Obj::Int(_) | Obj::BigInt(_) => "an int",
        Obj::Float(_) => "a float",
        Obj::Str(_) => "a string",
        Obj::Bytes(_) => "bytes",
        Obj::List(_) => "a list",
        Obj::Tuple(_) => "a tuple",
        Obj::Dict(_) => "a dict",
        Obj::Set(_) => "a set",
        Obj::Global { .. } => "a global",
        Obj::Call { .. } => "an object",
        Obj::Buffer(_) => "a buffer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_basic_values_and_shares_memoised_objects() {
        // pickle.dumps([1, "a", (2.5, None), {"k": True}], protocol=2) with a shared list
        let data: &[u8] = b"\x80\x02]q\x00(K\x01X\x01\x00\x00\x00aq\x01G@\x04\x00\x00\x00\x00\x00\x00N\x86q\x02}q\x03X\x01\x00\x00\x00kq\x04\x88sh\x00e.";
        let g = read(data).unwrap();
        let Obj::List(items) = g.get(g.root) else {
            panic!("{:?}", g.get(g.root))
        };
        assert_eq!(items.len(), 5);
        assert_eq!(g.get(items[0]), &Obj::Int(1));
        assert_eq!(g.get(items[1]), &Obj::Str("a".into()));
        // the list contains itself through the memo (a cycle, not a copy)
        assert_eq!(items[4], g.root);
    }

    #[test]
    fn hostile_lengths_and_truncation_are_errors() {
        for (data, want) in [
            (&b"\x80\x02X\xff\xff\xff\x7f"[..], "declared length"),
            (
                b"\x80\x02\x8e\xff\xff\xff\xff\xff\xff\xff\xff",
                "declared length",
            ),
            (b"\x80\x02]", "no STOP"),
            (b"\x80\x02h\x05.", "never stored"),
            (b"\x80\x02.", "empty stack"),
            (b"\x80\x02(K\x01t(.", "past a MARK"),
            (b"\x80\x09N.", "protocol 9"),
            (b"\x80\x05\x97.", "out-of-band buffer #0"),
            (b"\x80\x02K\x01K\x02b.", "BUILD on an int"),
            (b"\x80\x02\xff", "unknown opcode 0xff"),
            (b"tree\nversion=v4\n", "does not start with the PROTO"),
            (b"", "does not start with the PROTO"),
            (b"\x80\x02Q", "persistent ids"),
        ] {
            let e = read(data).unwrap_err().to_string();
            assert!(e.contains(want), "{data:?}: {e}");
        }
    }

    #[test]
    fn limits_bound_nodes_and_stack() {
        let deep: Vec<u8> = std::iter::once(0x80)
            .chain([2])
            .chain(std::iter::repeat_n(b'(', 100))
            .collect();
        let small = Limits {
            max_stack: 50,
            ..Limits::default()
        };
        let e = read_with_buffers(&deep, Vec::new(), small).unwrap_err();
        assert!(e.reason.contains("stack deeper than 50"), "{e}");
        let many: Vec<u8> = [0x80, 2]
            .into_iter()
            .chain(std::iter::repeat_n(b'N', 100))
            .collect();
        let e = read_with_buffers(
            &many,
            Vec::new(),
            Limits {
                max_nodes: 10,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(e.reason.contains("more than 10 objects"), "{e}");
    }

    #[test]
    fn globals_and_calls_are_recorded_never_resolved() {
        // cos\nsystem\n(S'echo hi'\ntR. in protocol 2 binary form
        let data = b"\x80\x02cos\nsystem\nX\x07\x00\x00\x00echo hi\x85R.";
        let g = read(data).unwrap();
        assert_eq!(g.globals, vec![("os".to_string(), "system".to_string())]);
        assert!(matches!(g.get(g.root), Obj::Call { newobj: false, .. }));
    }

    #[test]
    fn big_integers_and_negative_longs() {
        let g = read(b"\x80\x02\x8a\x02\x00\xff.").unwrap();
        assert_eq!(g.get(g.root), &Obj::Int(-256));
        let g = read(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap();
        assert!(matches!(g.get(g.root), Obj::BigInt(_)));
    }
}
