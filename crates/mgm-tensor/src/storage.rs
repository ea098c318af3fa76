//! The buffers behind tensors: owned vectors, or read-only views into a memory-mapped file.

use std::sync::Arc;

use half::{bf16, f16};

use crate::{DType, Error, Result, WithDType};

/// Host memory holding the elements of one or more tensor views.
#[derive(Debug)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f64 elements.
    F64(Vec<f64>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// i64 elements.
    I64(Vec<i64>),
    /// u32 elements.
    U32(Vec<u32>),
    /// u8 elements.
    U8(Vec<u8>),
    /// Elements read in place from a memory-mapped file (zero copy).
    Mapped(MappedBuffer),
}

/// A typed, aligned window into a memory map. Created only when the window is aligned for its
/// dtype, so casting the bytes to the element type is always valid.
#[derive(Debug, Clone)]
pub struct MappedBuffer {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len_bytes: usize,
    dtype: DType,
}

impl MappedBuffer {
    /// Wraps `map[start..start+len_bytes]` as elements of `dtype`, or returns `None` when the
    /// window is not aligned for the dtype (the caller then copies).
    pub fn new(
        map: Arc<memmap2::Mmap>,
        start: usize,
        len_bytes: usize,
        dtype: DType,
    ) -> Option<Self> {
        let ptr = map.as_ptr() as usize + start;
        let size = dtype.size_in_bytes();
        if !ptr.is_multiple_of(size)
            || !len_bytes.is_multiple_of(size)
            || start + len_bytes > map.len()
        {
            return None;
        }
        Some(MappedBuffer {
            map,
            start,
            len_bytes,
            dtype,
        })
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len_bytes]
    }
}

impl CpuStorage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::Mapped(m) => m.dtype,
        }
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        self.bytes().len() / self.dtype().size_in_bytes()
    }

    /// True when no elements are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the data is a view into a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, CpuStorage::Mapped(_))
    }

    /// The elements as raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F64(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::I64(v) => bytemuck::cast_slice(v),
            CpuStorage::U32(v) => bytemuck::cast_slice(v),
            CpuStorage::U8(v) => v,
            CpuStorage::Mapped(m) => m.bytes(),
        }
    }

    /// The elements as a typed slice; errors if `T` is not the storage's dtype.
    pub fn as_slice<T: WithDType>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype() {
            return Err(Error::UnexpectedDType {
                op: "as_slice",
                expected: T::DTYPE,
                actual: self.dtype(),
            });
        }
        // Alignment holds: owned vectors are typed, and MappedBuffer::new checked alignment.
        Ok(bytemuck::cast_slice(self.bytes()))
    }

    /// Builds owned storage of `dtype` from little-endian bytes (copying).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<Self> {
        let size = dtype.size_in_bytes();
        if !bytes.len().is_multiple_of(size) {
            return Err(Error::invalid_shape(
                "from_bytes",
                &[bytes.len()],
                format!(
                    "{} bytes is not a multiple of the {dtype} element size {size}",
                    bytes.len()
                ),
            ));
        }
        fn typed<T: WithDType>(bytes: &[u8]) -> Vec<T> {
            // pod_collect_to_vec copies into a properly aligned vector whatever the input alignment.
            bytemuck::pod_collect_to_vec(bytes)
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(typed(bytes)),
            DType::F64 => CpuStorage::F64(typed(bytes)),
            DType::F16 => CpuStorage::F16(typed(bytes)),
            DType::BF16 => CpuStorage::BF16(typed(bytes)),
            DType::I64 => CpuStorage::I64(typed(bytes)),
            DType::U32 => CpuStorage::U32(typed(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
        })
    }
}

/// Storage on some device. Only the CPU variant exists until the CUDA backend lands.
#[derive(Debug)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
}

impl Storage {
    /// The host storage (every tensor is on the CPU in this build).
    pub fn cpu(&self) -> &CpuStorage {
        match self {
            Storage::Cpu(s) => s,
        }
    }
}
