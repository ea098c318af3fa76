//! Reading and writing safetensors files.
//!
//! [`SafeTensorsFile::open`] memory-maps a file and validates its header once; [`SafeTensorsFile::get`]
//! then returns tensors that read their elements straight from the map (no copy), unless a
//! tensor's bytes are not aligned for its dtype, in which case that one tensor is copied.
//! [`save`] writes any of the seven dtypes; strided views are made contiguous on the way out.
//!
//! Every error names the file and, where one is concerned, the tensor. No byte sequence makes
//! the reader panic: sizes are computed with checked arithmetic and every offset is bounds-checked
//! before the map is sliced.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{CpuStorage, MappedBuffer};
use crate::{DType, Error, Result, Tensor, WithDType};

/// The dtypes this crate reads and writes, as the safetensors header spells them.
const SUPPORTED: &str = "F32, F64, F16, BF16, I64, U32, U8";

/// The safetensors crate refuses headers above this size; so do we (a corrupt length field
/// must not make us try to parse gigabytes as JSON).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// The safetensors name of a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
    }
}

fn to_st_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I64 => safetensors::Dtype::I64,
        DType::U32 => safetensors::Dtype::U32,
        DType::U8 => safetensors::Dtype::U8,
    }
}

fn from_st_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    Some(match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// Where one tensor lives in the map.
#[derive(Clone, Debug)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// How an opened safetensors file holds its bytes.
///
/// ```no_run
/// # use mgm_tensor::safetensors::{Residency, SafeTensorsFile};
/// // read once into huge-page memory: for weights streamed every step (LLM decode)
/// let f = SafeTensorsFile::open_with("model.safetensors", Residency::Resident)?;
/// let w = f.get("lm_head.weight")?; // a view, no further copy
/// # Ok::<(), mgm_tensor::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Memory-mapped from the file: zero copy, pages read on first touch, and only the touched
    /// ones count in the process's memory (4 KB pages of the page cache).
    #[default]
    Mapped,
    /// Read whole into anonymous memory at open, advised as transparent huge pages (Linux;
    /// elsewhere, or where the kernel declines, ordinary pages): one copy at load, like
    /// llama.cpp's `--no-mmap`, and streaming reads run faster than from 4 KB file pages (2-core
    /// Zen 5: 33-35 against 28-29 GB/s reading 600 MB with two threads).
    Resident,
}

/// A memory-mapped safetensors file with a validated header.
///
/// ```no_run
/// # use mgm_tensor::safetensors::SafeTensorsFile;
/// let f = SafeTensorsFile::open("model.safetensors")?;
/// let w = f.get("lm_head.weight")?; // reads from the map, no copy
/// assert!(w.cpu_storage().is_mapped());
/// # Ok::<(), mgm_tensor::Error>(())
/// ```
pub struct SafeTensorsFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafeTensorsFile({}, {} tensors)",
            self.path.display(),
            self.entries.len()
        )
    }
}

fn st_err(path: &Path, tensor: Option<&str>, msg: impl Into<String>) -> Error {
    Error::SafeTensors {
        path: path.display().to_string(),
        tensor: tensor.map(str::to_string),
        msg: msg.into(),
    }
}

impl SafeTensorsFile {
    /// Maps `path` and validates its header: JSON structure, supported dtypes, sizes matching
    /// shape times dtype, and data offsets inside the file without overlaps or gaps.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Residency::Mapped)
    }

    /// [`SafeTensorsFile::open`] with the bytes held as `residency` says.
    pub fn open_with(path: impl AsRef<Path>, residency: Residency) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(st_err(
                path,
                None,
                format!("file is truncated: {len} bytes, less than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only and shared. Modifying the file while it is mapped would
        // change what tensors read (the same contract as every mmap-based loader, safetensors'
        // own `safe_open` included); we never write through the map and `save` replaces files
        // by rename, so our own writes never alter a mapped file.
        let map = match residency {
            Residency::Mapped => unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(io)?,
            Residency::Resident => {
                let len = usize::try_from(len)
                    .map_err(|_| st_err(path, None, format!("{len} bytes do not fit in memory")))?;
                let mut anon = memmap2::MmapOptions::new()
                    .len(len)
                    .map_anon()
                    .map_err(io)?;
                // advice before the first touch, so the pages fault in huge; a kernel that
                // declines leaves ordinary pages, which only costs the speed
                #[cfg(target_os = "linux")]
                let _ = anon.advise(memmap2::Advice::HugePage);
                use std::io::Read;
                (&file).read_exact(&mut anon[..]).map_err(io)?;
                anon.make_read_only().map_err(io)?
            }
        };
        Self::from_map(path, Arc::new(map))
    }

    fn from_map(path: &Path, map: Arc<memmap2::Mmap>) -> Result<Self> {
        let (entries, metadata) = parse_header(path, &map)?;
        Ok(SafeTensorsFile {
            path: path.to_path_buf(),
            map,
            entries,
            metadata,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Dtype and shape of a tensor, without touching its data.
    pub fn info(&self, name: &str) -> Option<(DType, &[usize])> {
        self.entries
            .get(name)
            .map(|e| (e.dtype, e.shape.as_slice()))
    }

    /// The free-form `__metadata__` string map of the header (empty when absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The tensor `name`, reading from the map without copying (copied only when its bytes are
    /// not aligned for its dtype).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::TensorNotFound {
                name: name.to_string(),
                source_desc: self.path.display().to_string(),
            })?;
        let storage = match MappedBuffer::new(self.map.clone(), e.start, e.end - e.start, e.dtype) {
            Some(m) => CpuStorage::Mapped(m),
            None => CpuStorage::from_bytes(e.dtype, &self.map[e.start..e.end])
                .map_err(|err| st_err(&self.path, Some(name), err.to_string()))?,
        };
        Tensor::from_storage(storage, &e.shape)
            .map_err(|err| st_err(&self.path, Some(name), err.to_string()))
    }

    /// The tensor `name`, which must have element type `T`; the error names the tensor and
    /// both dtypes otherwise.
    pub fn get_typed<T: WithDType>(&self, name: &str) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dtype() != T::DTYPE {
            return Err(st_err(
                &self.path,
                Some(name),
                format!("has dtype {}, but {} was requested", t.dtype(), T::DTYPE),
            ));
        }
        Ok(t)
    }

    /// The elements of tensor `name` as `Vec<T>` (a copy); `T` must be its dtype.
    pub fn get_vec<T: WithDType>(&self, name: &str) -> Result<Vec<T>> {
        self.get_typed::<T>(name)?.to_vec::<T>()
    }

    /// Every tensor, by name (each zero-copy as in [`SafeTensorsFile::get`]).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.entries
            .keys()
            .map(|n| Ok((n.clone(), self.get(n)?)))
            .collect()
    }
}

/// Reads the header: `(entries by name, __metadata__)`, with every structural problem an error
/// naming the file and, when it concerns one, the tensor.
#[allow(clippy::type_complexity)]
fn parse_header(
    path: &Path,
    map: &[u8],
) -> Result<(BTreeMap<String, Entry>, HashMap<String, String>)> {
    let file_len = map.len();
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&map[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(st_err(
            path,
            None,
            format!("corrupt header: header length {header_len} exceeds the 100 MB limit"),
        ));
    }
    let header_len = header_len as usize;
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(st_err(
            path,
            None,
            format!(
                "file is truncated: header length {header_len} runs past the end of the {file_len}-byte file"
            ),
        ));
    }
    let header = std::str::from_utf8(&map[8..data_start])
        .map_err(|e| st_err(path, None, format!("corrupt header: not UTF-8 ({e})")))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|e| st_err(path, None, format!("corrupt header: invalid JSON ({e})")))?;

    let mut metadata = HashMap::new();
    let mut entries = BTreeMap::new();
    let data_len = file_len - data_start;
    for (name, value) in json {
        if name == "__metadata__" {
            let obj = value.as_object().ok_or_else(|| {
                st_err(
                    path,
                    None,
                    "corrupt header: __metadata__ is not a map of strings to strings",
                )
            })?;
            for (k, v) in obj {
                let v = v.as_str().ok_or_else(|| {
                    st_err(
                        path,
                        None,
                        format!("corrupt header: __metadata__ value of {k:?} is not a string"),
                    )
                })?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(value).map_err(|e| {
            st_err(
                path,
                Some(&name),
                format!("corrupt header entry: {e} (supported dtypes: {SUPPORTED})"),
            )
        })?;
        let dtype = from_st_dtype(info.dtype).ok_or_else(|| {
            st_err(
                path,
                Some(&name),
                format!(
                    "dtype {:?} is not supported (supported dtypes: {SUPPORTED})",
                    info.dtype
                ),
            )
        })?;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let nbytes = numel
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()))
            .ok_or_else(|| {
                st_err(
                    path,
                    Some(&name),
                    format!(
                        "corrupt header: shape {:?} overflows the address space",
                        info.shape
                    ),
                )
            })?;
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(st_err(
                path,
                Some(&name),
                format!("corrupt header: data offsets [{s}, {e}) end before they start"),
            ));
        }
        if e - s != nbytes {
            return Err(st_err(
                path,
                Some(&name),
                format!(
                    "size mismatch: data offsets [{s}, {e}) hold {} bytes, but shape {:?} of {} needs {nbytes}",
                    e - s,
                    info.shape,
                    dtype_name(dtype)
                ),
            ));
        }
        if e > data_len {
            return Err(st_err(
                path,
                Some(&name),
                format!(
                    "file is truncated or offsets are out of range: the tensor needs bytes [{s}, {e}) of the data \
                     section, which holds {data_len} bytes"
                ),
            ));
        }
        entries.insert(
            name,
            Entry {
                dtype,
                shape: info.shape,
                start: data_start + s,
                end: data_start + e,
            },
        );
    }

    // The format requires the data section to be covered exactly once, in offset order.
    let mut by_offset: Vec<(&String, &Entry)> = entries.iter().collect();
    by_offset.sort_by_key(|(_, e)| (e.start, e.end));
    let mut pos = data_start;
    let mut prev: Option<&str> = None;
    for (name, e) in &by_offset {
        if e.start < pos {
            let other = prev
                .map(|p| format!(" with tensor {p:?}"))
                .unwrap_or_default();
            return Err(st_err(
                path,
                Some(name),
                format!(
                    "corrupt header: data offsets [{}, {}) overlap{other}",
                    e.start - data_start,
                    e.end - data_start
                ),
            ));
        }
        if e.start > pos {
            return Err(st_err(
                path,
                Some(name),
                format!(
                    "corrupt header: a gap of {} bytes precedes the tensor's data offsets [{}, {})",
                    e.start - pos,
                    e.start - data_start,
                    e.end - data_start
                ),
            ));
        }
        pos = e.end;
        // zero-size tensors never overlap anything, so they do not become `prev`
        if e.end > e.start {
            prev = Some(name.as_str());
        }
    }
    if pos != file_len {
        return Err(st_err(
            path,
            None,
            format!(
                "corrupt file: {} trailing bytes after the last tensor's data",
                file_len - pos
            ),
        ));
    }
    Ok((entries, metadata))
}

/// All tensors of a file, by name (zero-copy; the map stays alive as long as any tensor does).
pub fn load(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    SafeTensorsFile::open(path)?.tensors()
}

struct SaveView<'a> {
    tensor: &'a Tensor,
    nbytes: usize,
}

impl safetensors::View for SaveView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        to_st_dtype(self.tensor.dtype())
    }
    fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let t = self.tensor;
        let size = t.dtype().size_in_bytes();
        if t.numel() == 0 {
            return Cow::Borrowed(&[]);
        }
        match t.layout().contiguous_range() {
            Some(r) => Cow::Borrowed(&t.cpu_storage().bytes()[r.start * size..r.end * size]),
            // Strided views are gathered one tensor at a time, while the writer streams.
            None => Cow::Owned(strided_bytes(t)),
        }
    }
    fn data_len(&self) -> usize {
        self.nbytes
    }
}

/// The elements of a strided view in logical order as little-endian bytes.
fn strided_bytes(t: &Tensor) -> Vec<u8> {
    fn gather<T: WithDType>(t: &Tensor) -> Vec<u8> {
        // Every tensor's storage holds its own dtype, so the typed read cannot fail.
        let s = t
            .storage_slice::<T>()
            .expect("storage dtype equals tensor dtype");
        let mut out: Vec<u8> = Vec::with_capacity(t.numel() * size_of::<T>());
        t.layout()
            .for_each_offset(|o| out.extend_from_slice(bytemuck::bytes_of(&s[o])));
        out
    }
    crate::ops::view::with_dtype!(t.dtype(), T => gather::<T>(t))
}

/// Writes tensors to `path` in safetensors format (with `__metadata__ = {"format": "pt"}` as
/// PyTorch writes it, so transformers accepts the file). Accepts `&[(name, &Tensor)]`,
/// `&HashMap<String, Tensor>` and similar. The file is written beside `path` and renamed into
/// place, so a file that is currently mapped is never truncated under its readers.
pub fn save<'a, K: AsRef<str>>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (K, &'a Tensor)>,
) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_with_metadata(path, tensors, meta)
}

/// Like [`save`] with an explicit `__metadata__` map.
pub fn save_with_metadata<'a, K: AsRef<str>>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (K, &'a Tensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut owned: Vec<(String, Tensor)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        let name = name.as_ref().to_string();
        if name == "__metadata__" {
            return Err(st_err(
                path,
                Some(&name),
                "this name is reserved for the header's metadata",
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(st_err(path, Some(&name), "the tensor name is given twice"));
        }
        owned.push((name, t.detach()));
    }
    let views: Vec<(&str, SaveView<'_>)> = owned
        .iter()
        .map(|(n, t)| {
            (
                n.as_str(),
                SaveView {
                    tensor: t,
                    nbytes: t.numel() * t.dtype().size_in_bytes(),
                },
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => Error::Io {
            path: path.display().to_string(),
            source,
        },
        e => st_err(path, None, e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::U32,
            DType::U8,
        ] {
            assert_eq!(from_st_dtype(to_st_dtype(d)), Some(d));
            assert!(SUPPORTED.contains(dtype_name(d)));
        }
        assert_eq!(from_st_dtype(safetensors::Dtype::BOOL), None);
    }
}
