//! `pytorch_model.bin`: the zip archive `torch.save` writes (`<name>/data.pkl` plus one entry per storage,
//! `<name>/data/<key>`).
//!
//! libtorch's C++ `torch::pickle_load` reads these, but tch 0.24 does not expose it (its `loadz_multi` reads
//! TorchScript's parameter format, not `torch.save`'s), so this module interprets the small subset of
//! Python's pickle protocol a state dict uses: dicts, tuples, strings, ints, `torch._utils._rebuild_tensor_v2`
//! and persistent ids naming storages. Anything else in the pickle becomes an opaque value and is ignored.

use super::read::{TensorSpec, check_shape, fill, place, read_placed};
use crate::load_error::LoadError;
use crate::weights::canonical_name;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage_key: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage { key: String, kind: Kind },
    Tensor(TensorRef),
    Opaque,
    Mark,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

type PResult<T> = Result<T, String>;

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or("truncated pickle")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|b| *b == b'\n').ok_or("unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> PResult<Value> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or("MARK missing")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> PResult<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.take(8)?;
                } // FRAME
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let mut v: i64 = 0;
                    for (i, byte) in b.iter().enumerate() {
                        v |= (*byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)))
                }
                b'X' | b'T' | 0x8c | b'U' | 0x8d => {
                    let n = match op {
                        0x8c | b'U' => self.u8()? as usize,
                        0x8d => {
                            let b = self.take(8)?;
                            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize
                        }
                        _ => self.u32()? as usize,
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'B' | b'C' => {
                    let n = if op == b'C' {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v = self.memo.get(&i).cloned().ok_or("memo key missing")?;
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n).ok_or("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = pairs(items)?;
                    self.stack.push(Value::Dict(dict))
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top()? {
                        l.push(v)
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top()? {
                        l.extend(items)
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top()? {
                        d.push((k, v))
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items)?;
                    if let Value::Dict(d) = self.top()? {
                        d.extend(new)
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?)
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?)
                }
                b'b' => {
                    // BUILD sets an object's state (the state dict's `_metadata`): not needed.
                    self.pop()?;
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }
}

/// The object a pickle holds.
fn unpickle(data: &[u8]) -> PResult<Value> {
    Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

fn pairs(items: Vec<Value>) -> PResult<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of dict items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `('storage', torch.FloatStorage, '0', 'cpu', numel)` → the storage it names.
fn persistent_load(pid: Value) -> PResult<Value> {
    let Value::Tuple(items) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(_, storage), Value::Str(key), ..] if tag == "storage" => {
            let kind = storage_kind(storage).ok_or_else(|| format!("unsupported storage type {storage}"))?;
            Ok(Value::Storage {
                key: key.clone(),
                kind,
            })
        }
        _ => Err("unsupported persistent id".into()),
    }
}

fn ints(v: &Value) -> PResult<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                _ => Err("tensor size/stride is not integers".to_string()),
            })
            .collect(),
        _ => Err("tensor size/stride is not a tuple".into()),
    }
}

fn reduce(callable: Value, args: Value) -> PResult<Value> {
    let Value::Global(module, name) = callable else {
        return Ok(Value::Opaque);
    };
    let args = match args {
        Value::Tuple(a) => a,
        _ => return Ok(Value::Opaque),
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => match args.as_slice() {
            [Value::Storage { key, kind }, Value::Int(offset), size, stride, ..] => {
                Ok(Value::Tensor(TensorRef {
                    storage_key: key.clone(),
                    kind: *kind,
                    offset: *offset,
                    size: ints(size)?,
                    stride: ints(stride)?,
                }))
            }
            _ => Err("unexpected arguments to _rebuild_tensor_v2".into()),
        },
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("unexpected arguments to _rebuild_parameter".into()),
        },
        _ => Ok(Value::Opaque),
    }
}

/// The (name, tensor) entries of the pickled state dict (also inside a `{"state_dict": …}` wrapper).
fn state_dict(root: Value) -> PResult<Vec<(String, TensorRef)>> {
    let Value::Dict(items) = root else {
        return Err("the pickle does not hold a dict".into());
    };
    let mut out = Vec::new();
    let mut nested = None;
    for (k, v) in items {
        match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => out.push((name, t)),
            (Value::Str(name), d @ Value::Dict(_)) if name == "state_dict" || name == "model" => {
                nested = Some(d)
            }
            _ => {}
        }
    }
    match (out.is_empty(), nested) {
        (true, Some(d)) => state_dict(d),
        _ => Ok(out),
    }
}

pub(super) fn load_file(
    path: &Path,
    wanted: &HashMap<&str, &TensorSpec>,
    put: &mut dyn FnMut(String, Tensor),
) -> Result<(), LoadError> {
    let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        LoadError::bad_file(
            path,
            format!("not a torch.save zip archive ({e}); re-save it with torch >= 1.6"),
        )
    })?;
    let pkl_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| LoadError::bad_file(path, "no data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    archive
        .by_name(&pkl_name)
        .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| LoadError::bad_file(path, format!("reading data.pkl: {e}")))?;
    let root = unpickle(&pkl).map_err(|e| LoadError::bad_file(path, format!("data.pkl: {e}")))?;
    let entries = state_dict(root).map_err(|e| LoadError::bad_file(path, format!("data.pkl: {e}")))?;

    let entries: Vec<(String, TensorRef)> = entries
        .into_iter()
        .map(|(name, t)| (canonical_name(&name), t))
        .filter(|(name, _)| wanted.contains_key(name.as_str()))
        .collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &entries {
        *uses.entry(t.storage_key.as_str()).or_default() += 1;
    }
    // Storages shared by several tensors are read once per file and kept until the file is done.
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &entries {
        let spec = wanted[name.as_str()];
        check_shape(spec, &t.size)?;
        if !matches!(t.kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(LoadError::UnsupportedTensorDtype {
                name: name.clone(),
                dtype: format!("{:?}", t.kind),
            });
        }
        let entry_name = format!("{prefix}data/{}", t.storage_key);
        let numel: i64 = t.size.iter().product();
        let elt = t.kind.elt_size_in_bytes();
        if uses[t.storage_key.as_str()] == 1 && t.offset == 0 && is_contiguous(&t.size, &t.stride) {
            // The usual case: one tensor per storage, stored contiguously: read it straight to its place.
            let mut f = archive
                .by_name(&entry_name)
                .map_err(|e| LoadError::bad_file(path, format!("storage {entry_name}: {e}")))?;
            if (f.size() as usize) < numel as usize * elt {
                return Err(LoadError::bad_file(
                    path,
                    format!("tensor {name} lies outside its storage"),
                ));
            }
            put(
                name.clone(),
                read_placed(&mut f, path, spec, t.kind, numel as usize * elt)?,
            );
            continue;
        }
        let storage = match storages.get(&t.storage_key) {
            Some(s) => s.shallow_clone(),
            None => {
                let mut f = archive
                    .by_name(&entry_name)
                    .map_err(|e| LoadError::bad_file(path, format!("storage {entry_name}: {e}")))?;
                let nbytes = f.size() as usize;
                let s = Tensor::f_empty([(nbytes / elt) as i64], (t.kind, tch::Device::Cpu))?;
                fill(&mut f, path, &s, (nbytes / elt) * elt)?;
                storages.insert(t.storage_key.clone(), s.shallow_clone());
                s
            }
        };
        let last = t.offset
            + t.size
                .iter()
                .zip(&t.stride)
                .map(|(n, s)| (n - 1).max(0) * s)
                .sum::<i64>();
        if numel > 0 && (t.offset < 0 || last >= storage.numel() as i64) {
            return Err(LoadError::bad_file(
                path,
                format!("tensor {name} lies outside its storage"),
            ));
        }
        let view = storage
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?
            .f_contiguous()?;
        put(name.clone(), place(view, spec)?);
    }
    Ok(())
}

fn is_contiguous(size: &[i64], stride: &[i64]) -> bool {
    let mut expected = 1;
    for (n, s) in size.iter().zip(stride).rev() {
        if *n != 1 && *s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pickle assembled opcode by opcode, as `torch.save` writes `data.pkl` (protocol 2; opcode names as
    /// in CPython's `pickletools`).
    #[derive(Default)]
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn op(mut self, op: u8) -> Self {
            self.0.push(op);
            self
        }

        /// BINUNICODE: a u32 length, then UTF-8.
        fn str(mut self, s: &str) -> Self {
            self.0.push(b'X');
            self.0.extend((s.len() as u32).to_le_bytes());
            self.0.extend(s.as_bytes());
            self
        }

        /// GLOBAL: module and name, each ending in a newline.
        fn global(mut self, module: &str, name: &str) -> Self {
            self.0.push(b'c');
            self.0.extend(format!("{module}\n{name}\n").as_bytes());
            self
        }

        /// BININT1 below 256, BININT (a signed 32-bit integer) above.
        fn int(mut self, v: i32) -> Self {
            match u8::try_from(v) {
                Ok(small) => self.0.extend([b'K', small]),
                Err(_) => {
                    self.0.push(b'J');
                    self.0.extend(v.to_le_bytes());
                }
            }
            self
        }

        fn ints(self, values: &[i32]) -> Self {
            values.iter().fold(self.op(b'('), |p, v| p.int(*v)).op(b't')
        }

        /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`
        /// with PyTorch's persistent id `('storage', torch.<storage>, key, 'cpu', numel)` for the storage.
        fn tensor(self, storage: &str, key: &str, offset: i32, size: &[i32], stride: &[i32]) -> Self {
            let numel = size.iter().product::<i32>() + offset;
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .str("storage")
                .global("torch", storage)
                .str(key)
                .str("cpu")
                .int(numel)
                .op(b't')
                .op(b'Q') // BINPERSID
                .int(offset)
                .ints(size)
                .ints(stride)
                .op(0x89) // NEWFALSE: requires_grad
                .global("collections", "OrderedDict")
                .op(b')') // EMPTY_TUPLE
                .op(b'R') // REDUCE: the backward hooks, an empty OrderedDict
                .op(b't')
                .op(b'R')
        }

        /// PROTO 2, EMPTY_DICT, MARK: what every state dict starts with.
        fn state_dict() -> Self {
            Pickle::default().op(0x80).op(2).op(b'}').op(b'(')
        }

        /// SETITEMS, STOP.
        fn end(self) -> Vec<u8> {
            self.op(b'u').op(b'.').0
        }
    }

    fn entries(pickle: &[u8]) -> PResult<Vec<(String, TensorRef)>> {
        state_dict(unpickle(pickle)?)
    }

    fn entry(
        name: &str,
        key: &str,
        kind: Kind,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> (String, TensorRef) {
        let tensor = TensorRef {
            storage_key: key.into(),
            kind,
            offset,
            size: size.to_vec(),
            stride: stride.to_vec(),
        };
        (name.to_string(), tensor)
    }

    #[test]
    fn a_state_dict_entry_names_its_storage_dtype_shape_strides_and_offset() {
        let pickle = Pickle::state_dict()
            .str("transformer.wte.weight")
            .tensor("FloatStorage", "0", 0, &[2, 3], &[3, 1])
            .end();
        assert_eq!(
            entries(&pickle),
            Ok(vec![entry(
                "transformer.wte.weight",
                "0",
                Kind::Float,
                0,
                &[2, 3],
                &[3, 1]
            )])
        );
    }

    #[test]
    fn views_into_one_storage_keep_their_own_offsets_and_strides() {
        // A transposed view 70 000 elements in (BININT, not BININT1), next to a plain vector.
        let pickle = Pickle::state_dict()
            .str("lm_head.bias")
            .tensor("HalfStorage", "7", 0, &[4], &[1])
            .str("lm_head.weight")
            .tensor("HalfStorage", "7", 70_000, &[2, 3], &[1, 2])
            .end();
        assert_eq!(
            entries(&pickle),
            Ok(vec![
                entry("lm_head.bias", "7", Kind::Half, 0, &[4], &[1]),
                entry("lm_head.weight", "7", Kind::Half, 70_000, &[2, 3], &[1, 2]),
            ])
        );
    }

    #[test]
    fn a_parameter_inside_a_state_dict_wrapper_is_found() {
        // `torch.save({"state_dict": model.state_dict()})`, the tensor wrapped as an `nn.Parameter`.
        let pickle = Pickle::default()
            .op(0x80)
            .op(2)
            .op(b'}')
            .str("state_dict")
            .op(b'}')
            .op(b'(')
            .str("h.0.ln_1.bias")
            .global("torch._utils", "_rebuild_parameter")
            .op(b'(')
            .tensor("BFloat16Storage", "3", 0, &[8], &[1])
            .op(0x88) // NEWTRUE: requires_grad
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(b't')
            .op(b'R')
            .op(b'u')
            .op(b's') // SETITEM: "state_dict" → the inner dict
            .op(b'.')
            .0;
        assert_eq!(
            entries(&pickle),
            Ok(vec![entry("h.0.ln_1.bias", "3", Kind::BFloat16, 0, &[8], &[1])])
        );
    }

    #[test]
    fn truncated_input_is_an_error_at_every_cut() {
        let pickle = Pickle::state_dict()
            .str("transformer.ln_f.weight")
            .tensor("FloatStorage", "0", 0, &[4], &[1])
            .end();
        for cut in 0..pickle.len() {
            assert!(
                unpickle(&pickle[..cut]).is_err(),
                "cut at {cut} of {}",
                pickle.len()
            );
        }
        // Cut inside the name's length-prefixed bytes.
        let err = unpickle(&pickle[..8]).expect_err("truncated");
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn an_unsupported_opcode_is_named() {
        // PERSID (protocol 0's text persistent id), which `torch.save` never writes.
        let pickle = Pickle::state_dict().op(b'P').end();
        let err = unpickle(&pickle).expect_err("unsupported");
        assert!(err.contains("unsupported pickle opcode 0x50"), "{err}");
    }

    #[test]
    fn an_unknown_storage_type_is_named() {
        let pickle = Pickle::state_dict()
            .str("x")
            .tensor("ComplexFloatStorage", "0", 0, &[1], &[1])
            .end();
        let err = unpickle(&pickle).expect_err("unsupported");
        assert!(err.contains("ComplexFloatStorage"), "{err}");
    }
}
