//! Reading PyTorch checkpoints (`torch.save` of a state dict: a zip archive holding `data.pkl`
//! and one raw storage file per tensor) without running Python and without trusting the pickle.
//!
//! The unpickler is restricted: it implements the opcodes `torch.save` writes (protocols 2-4)
//! and resolves only the globals that rebuild tensors and dicts
//! (`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
//! `collections.OrderedDict`, the typed `torch.*Storage` classes). A pickle that names any other
//! global (`os.system`, `builtins.eval`, ...) is an error before anything is called; nothing is
//! ever executed. Tensors are copied out of their storages (offset, sizes and strides applied)
//! into contiguous tensors: f32, f64, f16, bf16, i64, u8, and int32/int16/int8/bool widened to
//! i64.
//!
//! ```no_run
//! let tensors = mgm_tensor::torch_pickle::load("open_clip_pytorch_model.bin")?;
//! let stem = &tensors["visual.trunk.stem.0.weight"];
//! # Ok::<(), mgm_tensor::Error>(())
//! ```

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::{DType, Error, Result, Tensor};

/// Globals the unpickler resolves; anything else is refused.
const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

/// A pickle value; scalar payloads are only read through `Debug` in error messages.
#[derive(Clone, Debug)]
#[allow(dead_code)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(String),
    Storage { class: String, key: String },
    Tensor(Tensor),
    Mark,
}

/// Loads every tensor of a `torch.save`d state dict (nested dicts flatten to dotted names).
pub fn load(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let err = |msg: String| Error::TorchCheckpoint {
        path: name.clone(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        err(format!(
            "not a torch.save zip archive ({e}); legacy (pre-1.6) checkpoints are not supported"
        ))
    })?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| err("no data.pkl in the archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut read = |entry: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(entry)
            .map_err(|e| err(format!("archive entry {entry}: {e}")))?;
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf).map_err(|e| {
            err(format!(
                "archive entry {entry} is truncated or corrupt: {e}"
            ))
        })?;
        Ok(buf)
    };
    if let Ok(order) = read(&format!("{prefix}byteorder"))
        && order.trim_ascii() != b"little"
    {
        return Err(err(format!(
            "byteorder {:?}: only little-endian checkpoints are supported",
            String::from_utf8_lossy(&order)
        )));
    }
    let pickle = read(&pkl_name)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let root = Unpickler {
        data: &pickle,
        pos: 0,
        err: &err,
        storage: &mut |key: &str| -> Result<Vec<u8>> {
            if let Some(b) = storages.get(key) {
                return Ok(b.clone());
            }
            let b = read(&format!("{prefix}data/{key}"))?;
            storages.insert(key.to_string(), b.clone());
            Ok(b)
        },
    }
    .run()?;
    let mut out = HashMap::new();
    flatten(root, String::new(), &mut out, &err)?;
    Ok(out)
}

fn flatten(
    v: V,
    prefix: String,
    out: &mut HashMap<String, Tensor>,
    err: &dyn Fn(String) -> Error,
) -> Result<()> {
    match v {
        V::Dict(items) => {
            for (k, val) in items {
                let key = match k {
                    V::Str(s) => s,
                    V::Int(i) => i.to_string(),
                    other => return Err(err(format!("a dict key is {other:?}, not a string"))),
                };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(val, name, out, err)?;
            }
            Ok(())
        }
        V::Tensor(t) => {
            out.insert(prefix, t);
            Ok(())
        }
        // metadata such as `_metadata` versions, or epoch counters beside the weights
        V::None | V::Bool(_) | V::Int(_) | V::Float(_) | V::Str(_) => Ok(()),
        other => Err(err(format!(
            "{prefix}: holds {}, not a tensor or a dict of tensors",
            kind(&other)
        ))),
    }
}

fn kind(v: &V) -> &'static str {
    match v {
        V::None => "None",
        V::Bool(_) => "a bool",
        V::Int(_) => "an int",
        V::Float(_) => "a float",
        V::Str(_) => "a string",
        V::Bytes(_) => "bytes",
        V::Tuple(_) => "a tuple",
        V::List(_) => "a list",
        V::Dict(_) => "a dict",
        V::Global(_) => "a class",
        V::Storage { .. } => "a storage",
        V::Tensor(_) => "a tensor",
        V::Mark => "a mark",
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    err: &'a dyn Fn(String) -> Error,
    storage: &'a mut dyn FnMut(&str) -> Result<Vec<u8>>,
}

impl Unpickler<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.pos + n > self.data.len() {
            return Err((self.err)(format!(
                "data.pkl is truncated at byte {} (needs {n} more)",
                self.pos
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.take(1)?;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> Result<V> {
        let b = self.take(n)?.to_vec();
        String::from_utf8(b)
            .map(V::Str)
            .map_err(|_| (self.err)("a string in data.pkl is not UTF-8".into()))
    }

    fn global(&self, module: &str, name: &str) -> Result<V> {
        let full = format!("{module}.{name}");
        if ALLOWED.contains(&full.as_str()) {
            Ok(V::Global(full))
        } else {
            Err((self.err)(format!(
                "the pickle asks for the global `{full}`; only the globals that rebuild tensors \
                 are allowed, so it was not loaded (convert it where you trust it, or get a \
                 safetensors file)"
            )))
        }
    }

    fn run(mut self) -> Result<V> {
        let mut stack: Vec<V> = Vec::new();
        let mut memo: HashMap<u32, V> = HashMap::new();
        let err = self.err;
        let pop = |stack: &mut Vec<V>| {
            stack
                .pop()
                .ok_or_else(|| err("pickle stack underflow".into()))
        };
        let pop_mark = |stack: &mut Vec<V>| -> Result<Vec<V>> {
            let at = stack
                .iter()
                .rposition(|v| matches!(v, V::Mark))
                .ok_or_else(|| err("pickle MARK missing".into()))?;
            let items = stack.split_off(at + 1);
            stack.pop();
            Ok(items)
        };
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO n
                }
                0x95 => {
                    self.take(8)?; // FRAME length
                }
                b'.' => return pop(&mut stack), // STOP
                b'(' => stack.push(V::Mark),
                b'}' => stack.push(V::Dict(Vec::new())),
                b']' => stack.push(V::List(Vec::new())),
                b')' => stack.push(V::Tuple(Vec::new())),
                b'N' => stack.push(V::None),
                0x88 => stack.push(V::Bool(true)),
                0x89 => stack.push(V::Bool(false)),
                b'J' => {
                    let b = self.take(4)?;
                    stack.push(V::Int(i64::from(i32::from_le_bytes([
                        b[0], b[1], b[2], b[3],
                    ]))));
                }
                b'K' => {
                    let v = self.u8()?;
                    stack.push(V::Int(i64::from(v)));
                }
                b'M' => {
                    let b = self.take(2)?;
                    stack.push(V::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
                }
                0x8a => {
                    // LONG1: little-endian two's complement
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(err(format!("an integer of {n} bytes does not fit i64")));
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i64::from(x) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    stack.push(V::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    stack.push(V::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    stack.push(v);
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    stack.push(v);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    stack.push(V::Bytes(self.take(n)?.to_vec()));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    stack.push(V::Bytes(self.take(n)?.to_vec()));
                }
                b'q' => {
                    let i = u32::from(self.u8()?);
                    memo.insert(
                        i,
                        stack
                            .last()
                            .cloned()
                            .ok_or_else(|| err("BINPUT on an empty stack".into()))?,
                    );
                }
                b'r' => {
                    let i = self.u32()?;
                    memo.insert(
                        i,
                        stack
                            .last()
                            .cloned()
                            .ok_or_else(|| err("LONG_BINPUT on an empty stack".into()))?,
                    );
                }
                0x94 => {
                    let i = memo.len() as u32;
                    memo.insert(
                        i,
                        stack
                            .last()
                            .cloned()
                            .ok_or_else(|| err("MEMOIZE on an empty stack".into()))?,
                    );
                }
                b'h' => {
                    let i = u32::from(self.u8()?);
                    stack.push(
                        memo.get(&i)
                            .cloned()
                            .ok_or_else(|| err(format!("memo {i} is unset")))?,
                    );
                }
                b'j' => {
                    let i = self.u32()?;
                    stack.push(
                        memo.get(&i)
                            .cloned()
                            .ok_or_else(|| err(format!("memo {i} is unset")))?,
                    );
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    stack.push(self.global(&module, &name)?);
                }
                0x93 => {
                    let name = pop(&mut stack)?;
                    let module = pop(&mut stack)?;
                    match (module, name) {
                        (V::Str(m), V::Str(n)) => stack.push(self.global(&m, &n)?),
                        _ => return Err(err("STACK_GLOBAL without two strings".into())),
                    }
                }
                b't' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(V::Tuple(items));
                }
                0x85 => {
                    let a = pop(&mut stack)?;
                    stack.push(V::Tuple(vec![a]));
                }
                0x86 => {
                    let b = pop(&mut stack)?;
                    let a = pop(&mut stack)?;
                    stack.push(V::Tuple(vec![a, b]));
                }
                0x87 => {
                    let c = pop(&mut stack)?;
                    let b = pop(&mut stack)?;
                    let a = pop(&mut stack)?;
                    stack.push(V::Tuple(vec![a, b, c]));
                }
                b'a' => {
                    let v = pop(&mut stack)?;
                    match stack.last_mut() {
                        Some(V::List(l)) => l.push(v),
                        _ => return Err(err("APPEND to something that is not a list".into())),
                    }
                }
                b'e' => {
                    let items = pop_mark(&mut stack)?;
                    match stack.last_mut() {
                        Some(V::List(l)) => l.extend(items),
                        _ => return Err(err("APPENDS to something that is not a list".into())),
                    }
                }
                b's' => {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    match stack.last_mut() {
                        Some(V::Dict(d)) => d.push((k, v)),
                        _ => return Err(err("SETITEM on something that is not a dict".into())),
                    }
                }
                b'u' => {
                    let items = pop_mark(&mut stack)?;
                    if items.len() % 2 != 0 {
                        return Err(err("SETITEMS with an odd number of items".into()));
                    }
                    match stack.last_mut() {
                        Some(V::Dict(d)) => {
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v));
                            }
                        }
                        _ => return Err(err("SETITEMS on something that is not a dict".into())),
                    }
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    stack.push(persistent(pid, err)?);
                }
                b'R' => {
                    let args = pop(&mut stack)?;
                    let f = pop(&mut stack)?;
                    let v = self.reduce(f, args)?;
                    stack.push(v);
                }
                b'b' => {
                    // BUILD: only the empty / metadata state of an OrderedDict is accepted
                    let state = pop(&mut stack)?;
                    match (stack.last(), &state) {
                        (Some(V::Dict(_)), V::None | V::Dict(_) | V::Tuple(_)) => {}
                        (Some(V::Tensor(_)), V::None | V::Dict(_) | V::Tuple(_)) => {}
                        _ => {
                            return Err(err(
                                "BUILD on an object the unpickler does not rebuild".into()
                            ));
                        }
                    }
                }
                other => {
                    return Err(err(format!(
                        "pickle opcode 0x{other:02x} at byte {} is not one torch.save writes",
                        self.pos - 1
                    )));
                }
            }
        }
    }

    fn reduce(&mut self, f: V, args: V) -> Result<V> {
        let err = self.err;
        let V::Global(name) = f else {
            return Err(err(format!(
                "REDUCE calls {}, not an allowed global",
                kind(&f)
            )));
        };
        let V::Tuple(args) = args else {
            return Err(err(format!(
                "{name} called with {} instead of a tuple",
                kind(&args)
            )));
        };
        match name.as_str() {
            "collections.OrderedDict" => Ok(V::Dict(Vec::new())),
            "torch._utils._rebuild_parameter" => match args.into_iter().next() {
                Some(t @ V::Tensor(_)) => Ok(t),
                _ => Err(err("_rebuild_parameter without a tensor".into())),
            },
            "torch._utils._rebuild_tensor_v2" => {
                let mut it = args.into_iter();
                let (storage, offset, size, stride) = (it.next(), it.next(), it.next(), it.next());
                let ints = |v: Option<V>, what: &str| -> Result<Vec<usize>> {
                    match v {
                        Some(V::Tuple(t)) => t
                            .into_iter()
                            .map(|x| match x {
                                V::Int(i) if i >= 0 => Ok(i as usize),
                                _ => Err(err(format!("tensor {what} holds a non-integer"))),
                            })
                            .collect(),
                        _ => Err(err(format!("tensor {what} is not a tuple"))),
                    }
                };
                let Some(V::Storage { class, key }) = storage else {
                    return Err(err("_rebuild_tensor_v2 without a storage".into()));
                };
                let Some(V::Int(offset)) = offset else {
                    return Err(err("_rebuild_tensor_v2 without an offset".into()));
                };
                let (size, stride) = (ints(size, "size")?, ints(stride, "stride")?);
                let bytes = (self.storage)(&key)?;
                Ok(V::Tensor(rebuild(
                    &class,
                    &bytes,
                    offset as usize,
                    &size,
                    &stride,
                    &key,
                    err,
                )?))
            }
            other => Err(err(format!("REDUCE calls `{other}`, which is not allowed"))),
        }
    }
}

fn persistent(pid: V, err: &dyn Fn(String) -> Error) -> Result<V> {
    let V::Tuple(t) = pid else {
        return Err(err("a persistent id is not a tuple".into()));
    };
    match t.as_slice() {
        [
            V::Str(tag),
            V::Global(class),
            V::Str(key),
            _location,
            _numel,
        ] if tag == "storage" => Ok(V::Storage {
            class: class.clone(),
            key: key.clone(),
        }),
        _ => Err(err(format!("persistent id {t:?} is not a tensor storage"))),
    }
}

/// A contiguous tensor from `size` / `stride` (elements) at `offset` into a storage's bytes.
fn rebuild(
    class: &str,
    bytes: &[u8],
    offset: usize,
    size: &[usize],
    stride: &[usize],
    key: &str,
    err: &dyn Fn(String) -> Error,
) -> Result<Tensor> {
    let (width, dtype) = match class {
        "torch.FloatStorage" => (4, DType::F32),
        "torch.DoubleStorage" => (8, DType::F64),
        "torch.HalfStorage" => (2, DType::F16),
        "torch.BFloat16Storage" => (2, DType::BF16),
        "torch.LongStorage" => (8, DType::I64),
        "torch.IntStorage" => (4, DType::I64),
        "torch.ShortStorage" => (2, DType::I64),
        "torch.CharStorage" | "torch.BoolStorage" => (1, DType::I64),
        "torch.ByteStorage" => (1, DType::U8),
        other => return Err(err(format!("storage class {other} is not supported"))),
    };
    if size.len() != stride.len() {
        return Err(err(format!(
            "storage {key}: size {size:?} and stride {stride:?} differ in rank"
        )));
    }
    let numel: usize = size.iter().product();
    let elems = bytes.len() / width;
    // the furthest element the view reaches must lie inside the storage
    let last = offset
        + size
            .iter()
            .zip(stride)
            .map(|(&n, &s)| n.saturating_sub(1) * s)
            .sum::<usize>();
    if numel > 0 && last >= elems {
        return Err(err(format!(
            "storage {key} holds {elems} elements, the tensor {size:?} (stride {stride:?}, offset \
             {offset}) reaches element {last}: the file is truncated or corrupt"
        )));
    }
    let mut idx = Vec::with_capacity(numel);
    let mut at = vec![0usize; size.len()];
    for _ in 0..numel {
        idx.push(offset + at.iter().zip(stride).map(|(&i, &s)| i * s).sum::<usize>());
        for d in (0..size.len()).rev() {
            at[d] += 1;
            if at[d] < size[d] {
                break;
            }
            at[d] = 0;
        }
    }
    let el = |i: usize| &bytes[i * width..(i + 1) * width];
    match (class, dtype) {
        (_, DType::F32) => Tensor::from_vec(
            idx.iter()
                .map(|&i| f32::from_le_bytes(el(i).try_into().expect("4")))
                .collect::<Vec<_>>(),
            size,
        ),
        (_, DType::F64) => Tensor::from_vec(
            idx.iter()
                .map(|&i| f64::from_le_bytes(el(i).try_into().expect("8")))
                .collect::<Vec<_>>(),
            size,
        ),
        (_, DType::F16) => Tensor::from_vec(
            idx.iter()
                .map(|&i| half::f16::from_le_bytes(el(i).try_into().expect("2")))
                .collect::<Vec<_>>(),
            size,
        ),
        (_, DType::BF16) => Tensor::from_vec(
            idx.iter()
                .map(|&i| half::bf16::from_le_bytes(el(i).try_into().expect("2")))
                .collect::<Vec<_>>(),
            size,
        ),
        (_, DType::U8) => Tensor::from_vec(idx.iter().map(|&i| bytes[i]).collect::<Vec<_>>(), size),
        ("torch.LongStorage", _) => Tensor::from_vec(
            idx.iter()
                .map(|&i| i64::from_le_bytes(el(i).try_into().expect("8")))
                .collect::<Vec<_>>(),
            size,
        ),
        ("torch.IntStorage", _) => Tensor::from_vec(
            idx.iter()
                .map(|&i| i64::from(i32::from_le_bytes(el(i).try_into().expect("4"))))
                .collect::<Vec<_>>(),
            size,
        ),
        ("torch.ShortStorage", _) => Tensor::from_vec(
            idx.iter()
                .map(|&i| i64::from(i16::from_le_bytes(el(i).try_into().expect("2"))))
                .collect::<Vec<_>>(),
            size,
        ),
        ("torch.CharStorage", _) => Tensor::from_vec(
            idx.iter()
                .map(|&i| i64::from(bytes[i] as i8))
                .collect::<Vec<_>>(),
            size,
        ),
        _ => Tensor::from_vec(
            idx.iter()
                .map(|&i| i64::from(bytes[i] != 0))
                .collect::<Vec<_>>(),
            size,
        ),
    }
}
