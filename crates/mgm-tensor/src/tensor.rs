//! The `Tensor` type: shared storage plus a view layout, and an optional autograd node.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use half::{bf16, f16};

use crate::autograd::Node;
use crate::shape::Layout;
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Device, Error, Float, Result, WithDType};

/// A unique id per tensor node, used as the key of gradient maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// An n-dimensional array. Cloning is cheap (an `Arc` bump); views (reshape, permute, narrow,
/// broadcast) share the storage and only change the layout.
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<TensorInner>);

pub(crate) struct TensorInner {
    pub(crate) id: TensorId,
    pub(crate) storage: Arc<Storage>,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) node: Option<Node>,
}

/// Contiguous tensor data in the precision ops compute in: f32 (also for f16/bf16) or f64.
pub(crate) enum FloatData<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
}

/// Runs `$body` with `$v` bound to the contiguous compute-precision data of a float tensor,
/// once per compute type, so kernels are written once, generic over [`Float`].
macro_rules! with_float {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::tensor::FloatData::F32($v) => $body,
            $crate::tensor::FloatData::F64($v) => $body,
        }
    };
}
pub(crate) use with_float;

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {}",
            self.shape(),
            self.dtype(),
            self.device()
        )?;
        if self.is_tracked() {
            f.write_str(", tracked")?;
        }
        let n = self.numel();
        if n <= 16
            && let Ok(v) = self.to_vec_f64()
        {
            write!(f, ", {v:?}")?;
        }
        f.write_str("]")
    }
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    /// Wraps owned storage as a contiguous tensor of `shape` (no autograd node).
    pub(crate) fn from_storage(storage: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if storage.len() != numel {
            return Err(Error::invalid_shape(
                "from_storage",
                shape,
                format!(
                    "{} elements given for a shape of {numel} elements",
                    storage.len()
                ),
            ));
        }
        let dtype = storage.dtype();
        Ok(Tensor(Arc::new(TensorInner {
            id: TensorId::new(),
            storage: Arc::new(Storage::Cpu(storage)),
            layout: Layout::contiguous(shape),
            dtype,
            device: Device::Cpu,
            node: None,
        })))
    }

    /// A new untracked view of this tensor's storage with another layout.
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::new(),
            storage: self.0.storage.clone(),
            layout,
            dtype: self.0.dtype,
            device: self.0.device,
            node: None,
        }))
    }

    /// Same data and layout, new id and the given autograd node.
    pub(crate) fn with_node(&self, node: Option<Node>) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::new(),
            storage: self.0.storage.clone(),
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            node,
        }))
    }

    /// A tensor from a vector and a shape.
    ///
    /// ```
    /// # use mgm_tensor::Tensor;
    /// let t = Tensor::from_vec(vec![1f32, 2., 3., 4.], &[2, 2])?;
    /// assert_eq!(t.shape(), &[2, 2]);
    /// # Ok::<(), mgm_tensor::Error>(())
    /// ```
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(Error::invalid_shape(
                "from_vec",
                shape,
                format!(
                    "{} elements given for a shape of {numel} elements",
                    data.len()
                ),
            ));
        }
        Self::from_storage(T::into_storage(data), shape)
    }

    /// A tensor copied from a slice.
    pub fn from_slice<T: WithDType>(data: &[T], shape: &[usize]) -> Result<Tensor> {
        Self::from_vec(data.to_vec(), shape)
    }

    /// A scalar (rank-0) tensor.
    pub fn scalar<T: WithDType>(v: T) -> Tensor {
        Self::from_storage(T::into_storage(vec![v]), &[]).expect("one element fits shape []")
    }

    /// A tensor of `shape` filled with `value` converted to `dtype`.
    pub fn full(value: f64, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        device.ensure_available("full")?;
        let n: usize = shape.iter().product();
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(vec![value as f32; n]),
            DType::F64 => CpuStorage::F64(vec![value; n]),
            DType::F16 => CpuStorage::F16(vec![f16::from_f64(value); n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(value); n]),
            DType::I64 => CpuStorage::I64(vec![value as i64; n]),
            DType::U32 => CpuStorage::U32(vec![value as u32; n]),
            DType::U8 => CpuStorage::U8(vec![value as u8; n]),
        };
        Self::from_storage(storage, shape)
    }

    /// Zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(0.0, shape, dtype, device)
    }

    /// Ones.
    pub fn ones(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(1.0, shape, dtype, device)
    }

    /// Zeros with this tensor's shape, dtype and device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Self::zeros(self.shape(), self.dtype(), self.device())
    }

    /// Ones with this tensor's shape, dtype and device.
    pub fn ones_like(&self) -> Result<Tensor> {
        Self::ones(self.shape(), self.dtype(), self.device())
    }

    /// `[start, start + step, ...)` up to but excluding `end`, like `torch.arange`.
    pub fn arange(start: f64, end: f64, step: f64, dtype: DType, device: Device) -> Result<Tensor> {
        device.ensure_available("arange")?;
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(Error::invalid_shape(
                "arange",
                &[],
                format!("start {start}, end {end}, step {step}"),
            ));
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
        Tensor::from_vec(v, &[n])?.to_dtype(dtype)
    }

    /// Converts from a typed buffer in compute precision to a tensor of `dtype`
    /// (f32 compute may be stored as f16/bf16).
    pub(crate) fn from_float_vec<F: Float>(
        data: Vec<F>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        if F::DTYPE == dtype {
            return Self::from_vec(data, shape);
        }
        // Large outputs (a bf16 matmul's result) narrow in parallel.
        fn narrow<F: Float, D: Send>(data: &[F], conv: impl Fn(F) -> D + Sync + Send) -> Vec<D> {
            if data.len() >= 1 << 16 {
                use rayon::prelude::*;
                data.par_iter()
                    .with_min_len(1 << 14)
                    .map(|&v| conv(v))
                    .collect()
            } else {
                data.iter().map(|&v| conv(v)).collect()
            }
        }
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(narrow(&data, |v| v.to_f32())),
            DType::F64 => CpuStorage::F64(narrow(&data, |v| v.to_f64())),
            DType::F16 => CpuStorage::F16(narrow(&data, |v| f16::from_f32(v.to_f32()))),
            DType::BF16 => CpuStorage::BF16(narrow(&data, |v| bf16::from_f32(v.to_f32()))),
            d => {
                return Err(Error::unsupported_dtype(
                    "from_float_vec",
                    d,
                    "a float dtype is needed",
                ));
            }
        };
        Self::from_storage(storage, shape)
    }

    // ---------------------------------------------------------------- accessors

    /// The dims.
    pub fn shape(&self) -> &[usize] {
        self.0.layout.shape()
    }

    /// Alias of [`Tensor::shape`] as PyTorch names it.
    pub fn dims(&self) -> &[usize] {
        self.shape()
    }

    /// Number of dims.
    pub fn rank(&self) -> usize {
        self.shape().len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// Device.
    pub fn device(&self) -> Device {
        self.0.device
    }

    /// The view's layout (shape, strides, offset).
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        self.0.layout.strides()
    }

    /// Unique id (the key of gradient maps).
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// True if the elements are laid out row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// The size of dim `dim` (negative counts from the end).
    pub fn dim(&self, dim: isize) -> Result<usize> {
        let d = crate::shape::resolve_dim("dim", dim, self.shape())?;
        Ok(self.shape()[d])
    }

    /// The host storage backing this tensor.
    pub fn cpu_storage(&self) -> &CpuStorage {
        self.0.storage.cpu()
    }

    /// True when both tensors share one storage buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// The storage as a typed slice (the whole buffer, not only this view: index it with
    /// [`Tensor::layout`]).
    pub fn storage_slice<T: WithDType>(&self) -> Result<&[T]> {
        self.cpu_storage().as_slice::<T>()
    }

    /// This view's elements as a slice, when the view is contiguous.
    pub fn as_contiguous_slice<T: WithDType>(&self) -> Result<Option<&[T]>> {
        let s = self.storage_slice::<T>()?;
        Ok(self.0.layout.contiguous_range().map(|r| &s[r]))
    }

    // ---------------------------------------------------------------- data out

    /// The elements in logical row-major order as `Vec<T>`; `T` must be the tensor's dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        let s = self.storage_slice::<T>()?;
        if let Some(r) = self.0.layout.contiguous_range() {
            return Ok(s[r].to_vec());
        }
        // run by run: a permuted view whose last dim stays contiguous copies whole rows
        let mut out = Vec::with_capacity(self.numel());
        self.0.layout.for_each_run(|start, len, stride| {
            if stride == 1 {
                out.extend_from_slice(&s[start..start + len]);
            } else {
                out.extend((0..len).map(|i| s[start + i * stride]));
            }
        });
        Ok(out)
    }

    /// The elements of any dtype converted to f64, in logical order.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        fn conv<T: WithDType>(t: &Tensor) -> Result<Vec<f64>> {
            let s = t.storage_slice::<T>()?;
            let mut out = Vec::with_capacity(t.numel());
            t.0.layout.for_each_offset(|o| out.push(s[o].to_f64()));
            Ok(out)
        }
        match self.dtype() {
            DType::F32 => conv::<f32>(self),
            DType::F64 => conv::<f64>(self),
            DType::F16 => conv::<f16>(self),
            DType::BF16 => conv::<bf16>(self),
            DType::I64 => conv::<i64>(self),
            DType::U32 => conv::<u32>(self),
            DType::U8 => conv::<u8>(self),
        }
    }

    /// The single element of a one-element tensor, as f64.
    pub fn to_scalar_f64(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::invalid_shape(
                "to_scalar",
                self.shape(),
                "expected exactly one element",
            ));
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// The single element of a one-element tensor of type `T`.
    pub fn to_scalar<T: WithDType>(&self) -> Result<T> {
        if self.numel() != 1 {
            return Err(Error::invalid_shape(
                "to_scalar",
                self.shape(),
                "expected exactly one element",
            ));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// Contiguous logical-order data of a float tensor in compute precision, borrowed when the
    /// tensor is already a contiguous f32/f64 view.
    pub(crate) fn float_data(&self, op: &'static str) -> Result<FloatData<'_>> {
        let range = self.0.layout.contiguous_range();
        fn gather<T: WithDType, F: Float>(t: &Tensor) -> Result<Vec<F>> {
            let s = t.storage_slice::<T>()?;
            let mut out = Vec::with_capacity(t.numel());
            t.0.layout.for_each_run(|start, len, stride| {
                out.extend((0..len).map(|i| F::from_f32(s[start + i * stride].to_f32())));
            });
            Ok(out)
        }
        Ok(match self.dtype() {
            DType::F32 => {
                let s = self.storage_slice::<f32>()?;
                match range {
                    Some(r) => FloatData::F32(Cow::Borrowed(&s[r])),
                    None => FloatData::F32(Cow::Owned(self.to_vec::<f32>()?)),
                }
            }
            DType::F64 => {
                let s = self.storage_slice::<f64>()?;
                match range {
                    Some(r) => FloatData::F64(Cow::Borrowed(&s[r])),
                    None => FloatData::F64(Cow::Owned(self.to_vec::<f64>()?)),
                }
            }
            DType::F16 => FloatData::F32(Cow::Owned(gather::<f16, f32>(self)?)),
            DType::BF16 => FloatData::F32(Cow::Owned(gather::<bf16, f32>(self)?)),
            d => {
                return Err(Error::unsupported_dtype(
                    op,
                    d,
                    "a float dtype (f32, f64, f16, bf16) is needed",
                ));
            }
        })
    }

    /// Errors unless the tensor has a float dtype.
    pub(crate) fn ensure_float(&self, op: &'static str) -> Result<()> {
        if self.dtype().is_float() {
            Ok(())
        } else {
            Err(Error::unsupported_dtype(
                op,
                self.dtype(),
                "a float dtype (f32, f64, f16, bf16) is needed",
            ))
        }
    }

    /// Errors unless both tensors share dtype and device.
    pub(crate) fn ensure_same(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.device() != other.device() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: self.device(),
                rhs: other.device(),
            });
        }
        if self.dtype() != other.dtype() {
            return Err(Error::DTypeMismatch {
                op,
                lhs: self.dtype(),
                rhs: other.dtype(),
            });
        }
        Ok(())
    }

    // ---------------------------------------------------------------- copies and casts

    /// A contiguous copy when the view is strided; `self` (shared) when already contiguous with
    /// offset 0 and no slack.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let out = self.copy_untracked()?;
        // the copy is the identity for gradients
        Ok(crate::autograd::attach(out, || {
            crate::ops::view::IdentityBackward {
                input: self.clone(),
            }
        }))
    }

    /// A fresh contiguous buffer with this view's elements (no autograd node).
    pub(crate) fn copy_untracked(&self) -> Result<Tensor> {
        fn copy<T: WithDType>(t: &Tensor) -> Result<Tensor> {
            Tensor::from_vec(t.to_vec::<T>()?, t.shape())
        }
        match self.dtype() {
            DType::F32 => copy::<f32>(self),
            DType::F64 => copy::<f64>(self),
            DType::F16 => copy::<f16>(self),
            DType::BF16 => copy::<bf16>(self),
            DType::I64 => copy::<i64>(self),
            DType::U32 => copy::<u32>(self),
            DType::U8 => copy::<u8>(self),
        }
    }

    /// Converts to another dtype, like `tensor.to(dtype)`: floats round to nearest, float to
    /// integer truncates toward zero (saturating), integer to float rounds to nearest.
    /// Differentiable between float dtypes.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let out = self.cast_untracked(dtype)?;
        if self.dtype().is_float() && dtype.is_float() {
            Ok(crate::autograd::attach(out, || {
                crate::ops::view::CastBackward {
                    input: self.clone(),
                }
            }))
        } else {
            Ok(out)
        }
    }

    fn cast_untracked(&self, dtype: DType) -> Result<Tensor> {
        fn from<S: WithDType>(t: &Tensor, dtype: DType) -> Result<Tensor> {
            let s = t.storage_slice::<S>()?;
            fn to<S: WithDType, D: WithDType>(
                t: &Tensor,
                s: &[S],
                conv: impl Fn(S) -> D + Sync + Send,
            ) -> Result<Tensor> {
                // Contiguous views convert as a flat map, which vectorises, in parallel for
                // large tensors (bf16 matmul widens both operands through here).
                if let Some(r) = t.0.layout.contiguous_range() {
                    let src = &s[r];
                    let out: Vec<D> = if src.len() >= 1 << 16 {
                        use rayon::prelude::*;
                        src.par_iter()
                            .with_min_len(1 << 14)
                            .map(|&v| conv(v))
                            .collect()
                    } else {
                        src.iter().map(|&v| conv(v)).collect()
                    };
                    return Tensor::from_vec(out, t.shape());
                }
                let mut out = Vec::with_capacity(t.numel());
                t.0.layout.for_each_offset(|o| out.push(conv(s[o])));
                Tensor::from_vec(out, t.shape())
            }
            let src_is_f64 = S::DTYPE == DType::F64 || S::DTYPE == DType::I64;
            match dtype {
                // go through f64 for 64-bit sources so nothing is lost twice
                DType::F32 if src_is_f64 => to::<S, f32>(t, s, |v| v.to_f64() as f32),
                DType::F32 => to::<S, f32>(t, s, |v| v.to_f32()),
                DType::F64 => to::<S, f64>(t, s, |v| v.to_f64()),
                DType::F16 if src_is_f64 => to::<S, f16>(t, s, |v| f16::from_f64(v.to_f64())),
                DType::F16 => to::<S, f16>(t, s, |v| f16::from_f32(v.to_f32())),
                DType::BF16 if src_is_f64 => to::<S, bf16>(t, s, |v| bf16::from_f64(v.to_f64())),
                DType::BF16 => to::<S, bf16>(t, s, |v| bf16::from_f32(v.to_f32())),
                DType::I64 => to::<S, i64>(t, s, |v| v.to_f64() as i64),
                DType::U32 => to::<S, u32>(t, s, |v| v.to_f64() as u32),
                DType::U8 => to::<S, u8>(t, s, |v| v.to_f64() as u8),
            }
        }
        match self.dtype() {
            DType::F32 => from::<f32>(self, dtype),
            DType::F64 => from::<f64>(self, dtype),
            DType::F16 => from::<f16>(self, dtype),
            DType::BF16 => from::<bf16>(self, dtype),
            DType::I64 => from::<i64>(self, dtype),
            DType::U32 => from::<u32>(self, dtype),
            DType::U8 => from::<u8>(self, dtype),
        }
    }

    /// Moves to `device`. Only [`Device::Cpu`] is available in this build.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        device.ensure_available("to_device")?;
        Ok(self.clone())
    }
}
