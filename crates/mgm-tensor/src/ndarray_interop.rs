//! Conversions between [`Tensor`] and `ndarray` arrays.
//!
//! `from_ndarray` moves the array's buffer into the tensor when the array is in standard
//! (row-major, gap-free) layout; `as_ndarray_view` borrows the tensor's storage with the
//! tensor's own strides, so broadcast (stride 0) and transposed views cost nothing.

use ndarray::{ArrayD, ArrayViewD, IxDyn, ShapeBuilder};

use crate::{Error, Result, Tensor, WithDType};

impl Tensor {
    /// A tensor from an `ndarray` array: the buffer is moved (no copy) when the array is in
    /// standard layout and owns exactly its elements, and copied in logical order otherwise.
    pub fn from_ndarray<T: WithDType>(a: ArrayD<T>) -> Result<Tensor> {
        let shape = a.shape().to_vec();
        let numel = a.len();
        if a.is_standard_layout() {
            let (v, offset) = a.into_raw_vec_and_offset();
            // A sliced array can be standard layout yet start inside, or stop short of the end
            // of, its buffer: only a buffer holding exactly the elements can be moved as is.
            if v.len() == numel && (offset == Some(0) || numel == 0) {
                let v = if numel == 0 { Vec::new() } else { v };
                return Tensor::from_vec(v, &shape);
            }
            let start = offset.unwrap_or(0);
            let end = start
                .checked_add(numel)
                .filter(|&e| e <= v.len())
                .ok_or_else(|| {
                    Error::invalid_shape(
                        "from_ndarray",
                        &shape,
                        "array buffer is smaller than its shape",
                    )
                })?;
            return Tensor::from_vec(v[start..end].to_vec(), &shape);
        }
        Tensor::from_vec(a.iter().copied().collect(), &shape)
    }

    /// A copy of the tensor as an owned `ndarray` array in standard layout; `T` must be the
    /// tensor's dtype.
    pub fn to_ndarray<T: WithDType>(&self) -> Result<ArrayD<T>> {
        check_dtype::<T>("to_ndarray", self)?;
        let v = self.to_vec::<T>()?;
        ArrayD::from_shape_vec(IxDyn(self.shape()), v)
            .map_err(|e| Error::invalid_shape("to_ndarray", self.shape(), e.to_string()))
    }

    /// A borrowed `ndarray` view of the tensor's elements with the tensor's strides (no copy;
    /// broadcast dims have stride 0); `T` must be the tensor's dtype.
    pub fn as_ndarray_view<T: WithDType>(&self) -> Result<ArrayViewD<'_, T>> {
        check_dtype::<T>("as_ndarray_view", self)?;
        let s = self.storage_slice::<T>()?;
        if self.numel() == 0 {
            // ndarray bounds-checks the strides even when there is nothing to index
            return ArrayViewD::from_shape(IxDyn(self.shape()), &s[..0])
                .map_err(|e| Error::invalid_shape("as_ndarray_view", self.shape(), e.to_string()));
        }
        let layout = self.layout();
        let offset = layout.offset().min(s.len());
        let strides: Vec<usize> = layout.strides().to_vec();
        ArrayViewD::from_shape(IxDyn(self.shape()).strides(IxDyn(&strides)), &s[offset..]).map_err(
            |e| {
                Error::invalid_shape(
                    "as_ndarray_view",
                    self.shape(),
                    format!("strides {strides:?}: {e}"),
                )
            },
        )
    }
}

fn check_dtype<T: WithDType>(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() == T::DTYPE {
        Ok(())
    } else {
        Err(Error::UnexpectedDType {
            op,
            expected: T::DTYPE,
            actual: t.dtype(),
        })
    }
}
