//! ndarray interop: zero-copy moves and views, copies of strided tensors, and round trips on
//! contiguous, permuted and narrowed tensors.
mod common;
use common::*;

use mgm_tensor::{DType, Tensor};
use ndarray::{ArrayD, Dimension, IxDyn, s};
use proptest::prelude::*;

/// Plain-loop reference: element at multi-index `idx` of a row-major buffer of `shape`.
fn at(vals: &[f64], shape: &[usize], idx: &[usize]) -> f64 {
    let st = strides(shape);
    vals[idx.iter().zip(&st).map(|(i, s)| i * s).sum::<usize>()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn to_ndarray_and_view_match_every_layout(shape in shape_strategy(4, 4), kind in view_kind(), seed in 0u64..1000) {
        let n: usize = shape.iter().product();
        let vals = values(seed, n, 2.0);
        let t = make_view(&vals, &shape, kind, DType::F64);
        let a = t.to_ndarray::<f64>().unwrap();
        let v = t.as_ndarray_view::<f64>().unwrap();
        prop_assert_eq!(a.shape(), &shape[..]);
        prop_assert_eq!(v.shape(), &shape[..]);
        for ((idx, x), y) in a.indexed_iter().zip(v.iter()) {
            let want = at(&vals, &shape, idx.slice());
            prop_assert_eq!(*x, want);
            prop_assert_eq!(*y, want);
        }
        // back again: a standard-layout array moves in and keeps the values
        let back = Tensor::from_ndarray(a).unwrap();
        prop_assert_eq!(back.to_vec::<f64>().unwrap(), vals.clone());
        // a view converted to an owned array in its own (possibly strided) order, then back
        let back2 = Tensor::from_ndarray(v.to_owned()).unwrap();
        prop_assert_eq!(back2.to_vec::<f64>().unwrap(), vals);
    }

    #[test]
    fn round_trip_f32_f16_ints(shape in shape_strategy(3, 5), kind in view_kind()) {
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|i| (i % 200) as f64).collect();
        for dt in [DType::F32, DType::F16, DType::BF16, DType::I64, DType::U32, DType::U8] {
            let t = make_view(&vals, &shape, kind, dt);
            let back = match dt {
                DType::F32 => Tensor::from_ndarray(t.to_ndarray::<f32>().unwrap()).unwrap(),
                DType::F16 => Tensor::from_ndarray(t.to_ndarray::<half::f16>().unwrap()).unwrap(),
                DType::BF16 => Tensor::from_ndarray(t.as_ndarray_view::<half::bf16>().unwrap().to_owned()).unwrap(),
                DType::I64 => Tensor::from_ndarray(t.to_ndarray::<i64>().unwrap()).unwrap(),
                DType::U32 => Tensor::from_ndarray(t.as_ndarray_view::<u32>().unwrap().to_owned()).unwrap(),
                _ => Tensor::from_ndarray(t.to_ndarray::<u8>().unwrap()).unwrap(),
            };
            prop_assert_eq!(back.dtype(), dt);
            prop_assert_eq!(back.shape(), &shape[..]);
            prop_assert_eq!(back.to_vec_f64().unwrap(), vals.clone());
        }
    }
}

#[test]
fn from_ndarray_moves_a_standard_layout_buffer() {
    let a = ArrayD::from_shape_vec(IxDyn(&[3, 4]), (0..12).map(|i| i as f32).collect()).unwrap();
    let ptr = a.as_ptr();
    let t = Tensor::from_ndarray(a).unwrap();
    assert_eq!(
        t.storage_slice::<f32>().unwrap().as_ptr(),
        ptr,
        "the Vec must be moved, not copied"
    );
    assert_eq!(t.shape(), &[3, 4]);
    assert_eq!(
        t.to_vec::<f32>().unwrap(),
        (0..12).map(|i| i as f32).collect::<Vec<_>>()
    );
}

#[test]
fn from_ndarray_copies_transposed_and_sliced_arrays_in_logical_order() {
    let a = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1i64, 2, 3, 4, 5, 6]).unwrap();
    let t = Tensor::from_ndarray(a.clone().reversed_axes()).unwrap();
    assert_eq!(t.shape(), &[3, 2]);
    assert_eq!(t.to_vec::<i64>().unwrap(), vec![1, 4, 2, 5, 3, 6]);
    // standard layout, but starting inside its buffer
    let sliced = a.clone().slice_move(s![1.., ..]).into_dyn();
    assert!(sliced.is_standard_layout());
    let t = Tensor::from_ndarray(sliced).unwrap();
    assert_eq!(t.shape(), &[1, 3]);
    assert_eq!(t.to_vec::<i64>().unwrap(), vec![4, 5, 6]);
    // stepped slice
    let stepped = a.slice_move(s![.., ..;2]).into_dyn();
    let t = Tensor::from_ndarray(stepped).unwrap();
    assert_eq!(t.to_vec::<i64>().unwrap(), vec![1, 3, 4, 6]);
    // empty
    let e = ArrayD::<f32>::zeros(IxDyn(&[0, 5]));
    let t = Tensor::from_ndarray(e).unwrap();
    assert_eq!(t.shape(), &[0, 5]);
}

#[test]
fn ndarray_view_is_zero_copy_with_the_tensor_strides() {
    let base = Tensor::from_vec((0..24).map(|i| i as f32).collect::<Vec<_>>(), &[2, 3, 4]).unwrap();
    let storage_ptr = base.storage_slice::<f32>().unwrap().as_ptr();

    let v = base.as_ndarray_view::<f32>().unwrap();
    assert_eq!(v.as_ptr(), storage_ptr);

    // transposed view: strides carried over, same memory
    let p = base.permute(&[2, 0, 1]).unwrap();
    let v = p.as_ndarray_view::<f32>().unwrap();
    assert_eq!(v.as_ptr(), storage_ptr);
    assert_eq!(v.strides(), &[1, 12, 4]);
    assert_eq!(v[[3, 1, 2]], 1.0 * 12.0 + 2.0 * 4.0 + 3.0);

    // narrowed view starts at its offset
    let nrw = base.narrow(1, 1, 2).unwrap().narrow(2, 2, 2).unwrap();
    let v = nrw.as_ndarray_view::<f32>().unwrap();
    assert_eq!(v.as_ptr(), unsafe { storage_ptr.add(4 + 2) });
    assert_eq!(
        v.iter().copied().collect::<Vec<_>>(),
        nrw.to_vec::<f32>().unwrap()
    );

    // broadcast: stride 0, no copy
    let row = Tensor::from_vec(vec![1f32, 2., 3.], &[1, 3]).unwrap();
    let b = row.broadcast_as(&[4, 3]).unwrap();
    let v = b.as_ndarray_view::<f32>().unwrap();
    assert_eq!(v.strides(), &[0, 1]);
    assert_eq!(v.as_ptr(), row.storage_slice::<f32>().unwrap().as_ptr());
    assert_eq!(v.sum(), 4.0 * 6.0);
    assert_eq!(b.to_ndarray::<f32>().unwrap(), v.to_owned());
}

#[test]
fn wrong_element_type_is_an_error() {
    let t = Tensor::from_vec(vec![1i64, 2], &[2]).unwrap();
    let e = t.to_ndarray::<f32>().unwrap_err().to_string();
    assert!(
        e.contains("to_ndarray") && e.contains("i64") && e.contains("f32"),
        "{e}"
    );
    assert!(t.as_ndarray_view::<f64>().is_err());
}
