//! Smoke test of the core: autograd through views and broadcasting.
mod common;
use common::*;
use mgm_tensor::{DType, Tensor};

#[test]
fn smoke_autograd_and_views() {
    let a = Tensor::from_vec(values(1, 6, 1.0), &[2, 3]).unwrap();
    let b = Tensor::from_vec(values(2, 3, 1.0), &[3]).unwrap();
    grad_check("mul_bcast", &[a.clone(), b.clone()], &[true, true], |x| {
        x[0].mul(&x[1])?.exp()
    });
    grad_check(
        "div",
        &[a.clone(), b.affine(1.0, 3.0).unwrap()],
        &[true, true],
        |x| x[0].div(&x[1])?.gelu(),
    );
    grad_check("view", std::slice::from_ref(&a), &[true], |x| {
        x[0].t()?.narrow(0, 1, 2)?.sum_dims(&[0], true)?.tanh()
    });
    let v = make_view(
        &values(3, 24, 1.0),
        &[2, 3, 4],
        ViewKind::Narrowed,
        DType::F32,
    );
    assert!(!v.is_contiguous());
    let s = v.sum_dims(&[1], false).unwrap();
    assert_eq!(s.shape(), &[2, 4]);
    let c = Tensor::cat(&[a.clone(), a.clone()], 0).unwrap();
    assert_eq!(c.shape(), &[4, 3]);
}
