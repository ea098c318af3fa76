//! Elementwise binary arithmetic and comparisons with NumPy broadcasting, `where`, `masked_fill`.

use rayon::prelude::*;

use crate::autograd::{Backward, attach};
use crate::ops::unary::PAR_CHUNK;
use crate::ops::view::with_dtype;
use crate::shape::{Layout, broadcast_shapes};
use crate::tensor::FloatData;
use crate::{DType, Error, Float, Result, Tensor, WithDType};

/// An elementwise binary arithmetic op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b (integers: truncating; division by zero is an error)
    Div,
    /// max(a, b), NaN-propagating
    Maximum,
    /// min(a, b), NaN-propagating
    Minimum,
    /// a ^ b (floats only)
    Pow,
}

/// An elementwise comparison; the result has dtype u8 (0 or 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// a == b
    Eq,
    /// a != b
    Ne,
    /// a < b
    Lt,
    /// a <= b
    Le,
    /// a > b
    Gt,
    /// a >= b
    Ge,
}

impl BinaryOp {
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Pow => "pow",
        }
    }
}

/// Applies `f` to the elements of two views broadcast to `shape`, in logical order.
/// `a`/`b` are whole storage slices indexed through their (already broadcast) layouts.
pub(crate) fn zip_map<A: Copy + Sync, B: Copy + Sync, O: Copy + Send + Default>(
    a: &[A],
    la: &Layout,
    b: &[B],
    lb: &Layout,
    f: impl Fn(A, B) -> O + Sync,
) -> Vec<O> {
    let shape = la.shape();
    let n: usize = shape.iter().product();
    if let (Some(ra), Some(rb)) = (la.contiguous_range(), lb.contiguous_range()) {
        let (a, b) = (&a[ra], &b[rb]);
        let mut out = vec![O::default(); n];
        let body = |(o, (a, b)): (&mut [O], (&[A], &[B]))| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = f(x, y);
            }
        };
        if n >= 2 * PAR_CHUNK {
            out.par_chunks_mut(PAR_CHUNK)
                .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
                .for_each(body);
        } else {
            body((&mut out, (a, b)));
        }
        return out;
    }
    if n == 0 {
        return Vec::new();
    }
    let rank = shape.len();
    if rank == 0 {
        return vec![f(a[la.offset()], b[lb.offset()])];
    }
    let inner = shape[rank - 1];
    let (sa, sb) = (la.strides()[rank - 1], lb.strides()[rank - 1]);
    let rows = n / inner.max(1);
    let row_offsets = |r: usize| {
        // unravel the row index over the outer dims
        let (mut oa, mut ob, mut rem) = (la.offset(), lb.offset(), r);
        for k in (0..rank - 1).rev() {
            let i = rem % shape[k];
            rem /= shape[k];
            oa += i * la.strides()[k];
            ob += i * lb.strides()[k];
        }
        (oa, ob)
    };
    let mut out = vec![O::default(); n];
    let row = |(r, o): (usize, &mut [O])| {
        let (oa, ob) = row_offsets(r);
        for (i, o) in o.iter_mut().enumerate() {
            *o = f(a[oa + i * sa], b[ob + i * sb]);
        }
    };
    if n >= 2 * PAR_CHUNK && rows > 1 {
        out.par_chunks_mut(inner).enumerate().for_each(row);
    } else {
        out.chunks_mut(inner).enumerate().for_each(row);
    }
    out
}

/// Borrowed storage + layout when the dtype already is the compute type, otherwise an owned
/// converted copy with a contiguous layout; either way broadcast to `shape`.
fn operand<'a, F: Float>(
    t: &'a Tensor,
    shape: &[usize],
    op: &'static str,
) -> Result<(std::borrow::Cow<'a, [F]>, Layout)> {
    use std::borrow::Cow;
    if t.dtype() == F::DTYPE {
        let s = t.storage_slice::<F>()?;
        return Ok((Cow::Borrowed(s), t.layout().broadcast_as(op, shape)?));
    }
    let v: Vec<F> = match t.float_data(op)? {
        FloatData::F32(v) => v.iter().map(|&x| F::from_f32(x)).collect(),
        FloatData::F64(v) => v.iter().map(|&x| F::from_f64(x)).collect(),
    };
    Ok((
        Cow::Owned(v),
        Layout::contiguous(t.shape()).broadcast_as(op, shape)?,
    ))
}

fn float_binary<F: Float>(op: BinaryOp, a: &Tensor, b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (av, la) = operand::<F>(a, shape, op.name())?;
    let (bv, lb) = operand::<F>(b, shape, op.name())?;
    let out = match op {
        BinaryOp::Add => zip_map(&av, &la, &bv, &lb, |x, y| x + y),
        BinaryOp::Sub => zip_map(&av, &la, &bv, &lb, |x, y| x - y),
        BinaryOp::Mul => zip_map(&av, &la, &bv, &lb, |x, y| x * y),
        BinaryOp::Div => zip_map(&av, &la, &bv, &lb, |x, y| x / y),
        BinaryOp::Maximum => zip_map(
            &av,
            &la,
            &bv,
            &lb,
            |x, y| if x.is_nan() || x > y { x } else { y },
        ),
        BinaryOp::Minimum => zip_map(
            &av,
            &la,
            &bv,
            &lb,
            |x, y| if x.is_nan() || x < y { x } else { y },
        ),
        BinaryOp::Pow => zip_map(&av, &la, &bv, &lb, |x, y| x.powf(y)),
    };
    Tensor::from_float_vec(out, shape, a.dtype())
}

trait IntElem: WithDType + Default + Ord {
    fn wadd(self, o: Self) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wmul(self, o: Self) -> Self;
    fn cdiv(self, o: Self) -> Option<Self>;
}
macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl IntElem for $t {
            fn wadd(self, o: Self) -> Self { self.wrapping_add(o) }
            fn wsub(self, o: Self) -> Self { self.wrapping_sub(o) }
            fn wmul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn cdiv(self, o: Self) -> Option<Self> { self.checked_div(o) }
        }
    )*};
}
int_elem!(i64, u32, u8);

fn int_binary<T: IntElem>(op: BinaryOp, a: &Tensor, b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (av, bv) = (a.storage_slice::<T>()?, b.storage_slice::<T>()?);
    let la = a.layout().broadcast_as(op.name(), shape)?;
    let lb = b.layout().broadcast_as(op.name(), shape)?;
    let out: Vec<T> = match op {
        BinaryOp::Add => zip_map(av, &la, bv, &lb, |x: T, y| x.wadd(y)),
        BinaryOp::Sub => zip_map(av, &la, bv, &lb, |x: T, y| x.wsub(y)),
        BinaryOp::Mul => zip_map(av, &la, bv, &lb, |x: T, y| x.wmul(y)),
        BinaryOp::Maximum => zip_map(av, &la, bv, &lb, |x: T, y| x.max(y)),
        BinaryOp::Minimum => zip_map(av, &la, bv, &lb, |x: T, y| x.min(y)),
        BinaryOp::Div => {
            let q: Vec<Option<T>> = zip_map(av, &la, bv, &lb, |x: T, y| x.cdiv(y));
            q.into_iter().collect::<Option<Vec<T>>>().ok_or_else(|| {
                Error::out_of_bounds("div", format!("integer division by zero ({})", T::DTYPE))
            })?
        }
        BinaryOp::Pow => {
            return Err(Error::unsupported_dtype(
                "pow",
                T::DTYPE,
                "pow needs a float dtype",
            ));
        }
    };
    Tensor::from_vec(out, shape)
}

struct BinaryBackward {
    op: BinaryOp,
    lhs: Tensor,
    rhs: Tensor,
}

impl Backward for BinaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.lhs, &self.rhs]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&self.lhs, &self.rhs);
        let (ga, gb) = match self.op {
            BinaryOp::Add => (g.clone(), g.clone()),
            BinaryOp::Sub => (g.clone(), g.neg()?),
            BinaryOp::Mul => (g.mul(b)?, g.mul(a)?),
            BinaryOp::Div => (g.div(b)?, g.mul(out)?.div(b)?.neg()?),
            BinaryOp::Maximum | BinaryOp::Minimum => {
                // ties split the gradient evenly, as torch.maximum does
                let (win, tie) = if self.op == BinaryOp::Maximum {
                    (a.gt(b)?, a.eq_(b)?)
                } else {
                    (a.lt(b)?, a.eq_(b)?)
                };
                let wa = win
                    .to_dtype(g.dtype())?
                    .add(&tie.to_dtype(g.dtype())?.mul_scalar(0.5)?)?;
                let wa = wa.broadcast_as(out.shape())?;
                let wb = wa.affine(-1.0, 1.0)?;
                (g.mul(&wa)?, g.mul(&wb)?)
            }
            BinaryOp::Pow => {
                // d/da a^b = b a^(b-1); d/db a^b = a^b ln a
                let ga =
                    g.mul(&b.mul(&a.pow(&b.sub(&Tensor::scalar(1.0).to_dtype(b.dtype())?)?)?)?)?;
                let gb = g.mul(&out.mul(&a.log()?)?)?;
                (ga, gb)
            }
        };
        Ok(vec![
            Some(ga.sum_to_shape(a.shape())?),
            Some(gb.sum_to_shape(b.shape())?),
        ])
    }
}

impl Tensor {
    /// Applies a [`BinaryOp`] with NumPy broadcasting. Both operands must share dtype and device.
    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        self.ensure_same(op.name(), rhs)?;
        let shape = broadcast_shapes(op.name(), self.shape(), rhs.shape())?;
        let out = match self.dtype() {
            DType::F64 => float_binary::<f64>(op, self, rhs, &shape)?,
            DType::F32 | DType::F16 | DType::BF16 => float_binary::<f32>(op, self, rhs, &shape)?,
            DType::I64 => int_binary::<i64>(op, self, rhs, &shape)?,
            DType::U32 => int_binary::<u32>(op, self, rhs, &shape)?,
            DType::U8 => int_binary::<u8>(op, self, rhs, &shape)?,
        };
        if !self.dtype().is_float() {
            return Ok(out);
        }
        Ok(attach(out, || BinaryBackward {
            op,
            lhs: self.clone(),
            rhs: rhs.clone(),
        }))
    }

    /// self + rhs (broadcasting).
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    /// self - rhs (broadcasting).
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    /// self * rhs (broadcasting).
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    /// self / rhs (broadcasting).
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }
    /// Elementwise maximum (broadcasting).
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Maximum)
    }
    /// Elementwise minimum (broadcasting).
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Minimum)
    }
    /// self ^ rhs elementwise (broadcasting, floats).
    pub fn pow(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Pow)
    }

    /// Elementwise comparison with broadcasting; returns a u8 tensor of 0/1.
    pub fn cmp(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        self.ensure_same("cmp", rhs)?;
        let shape = broadcast_shapes("cmp", self.shape(), rhs.shape())?;
        fn run<T: WithDType>(a: &Tensor, b: &Tensor, shape: &[usize], op: CmpOp) -> Result<Tensor> {
            let la = a.layout().broadcast_as("cmp", shape)?;
            let lb = b.layout().broadcast_as("cmp", shape)?;
            let (av, bv) = (a.storage_slice::<T>()?, b.storage_slice::<T>()?);
            let f = |x: T, y: T| -> u8 {
                (match op {
                    CmpOp::Eq => x == y,
                    CmpOp::Ne => x != y,
                    CmpOp::Lt => x < y,
                    CmpOp::Le => x <= y,
                    CmpOp::Gt => x > y,
                    CmpOp::Ge => x >= y,
                }) as u8
            };
            Tensor::from_vec(zip_map(av, &la, bv, &lb, f), shape)
        }
        with_dtype!(self.dtype(), T => run::<T>(self, rhs, &shape, op))
    }

    /// self == rhs as u8.
    pub fn eq_(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Eq)
    }
    /// self != rhs as u8.
    pub fn ne(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Ne)
    }
    /// self < rhs as u8.
    pub fn lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Lt)
    }
    /// self <= rhs as u8.
    pub fn le(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Le)
    }
    /// self > rhs as u8.
    pub fn gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Gt)
    }
    /// self >= rhs as u8.
    pub fn ge(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Ge)
    }

    /// `cond ? on_true : on_false` elementwise with broadcasting of all three, like
    /// `torch.where(cond, a, b)`; `cond` is u8 (nonzero = true), `self` is the condition.
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        if self.dtype() != DType::U8 {
            return Err(Error::unsupported_dtype(
                "where",
                self.dtype(),
                "the condition must be u8 (as comparisons return)",
            ));
        }
        on_true.ensure_same("where", on_false)?;
        let s1 = broadcast_shapes("where", on_true.shape(), on_false.shape())?;
        let shape = broadcast_shapes("where", self.shape(), &s1)?;
        let c = self.broadcast_as(&shape)?.to_vec::<u8>()?;
        let cond = Tensor::from_vec(c, &shape)?;
        fn run<T: WithDType + Default>(
            cond: &Tensor,
            a: &Tensor,
            b: &Tensor,
            shape: &[usize],
        ) -> Result<Tensor> {
            let c = cond.storage_slice::<u8>()?;
            let la = a.layout().broadcast_as("where", shape)?;
            let lb = b.layout().broadcast_as("where", shape)?;
            let picked: Vec<T> = zip_map(
                a.storage_slice::<T>()?,
                &la,
                b.storage_slice::<T>()?,
                &lb,
                |x, y| (x, y),
            )
            .into_iter()
            .zip(c)
            .map(|((x, y), &c)| if c != 0 { x } else { y })
            .collect();
            Tensor::from_vec(picked, shape)
        }
        let out = with_dtype!(on_true.dtype(), T => run::<T>(&cond, on_true, on_false, &shape)?);
        if !on_true.dtype().is_float() {
            return Ok(out);
        }
        Ok(attach(out, || WhereBackward {
            cond,
            on_true: on_true.clone(),
            on_false: on_false.clone(),
        }))
    }

    /// Replaces elements where `mask` (u8, broadcast to self) is nonzero with `value`.
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        let fill = Tensor::full(value, &[], self.dtype(), self.device())?;
        let shape = broadcast_shapes("masked_fill", self.shape(), mask.shape())?;
        if shape != self.shape() {
            return Err(Error::shape_mismatch(
                "masked_fill",
                self.shape(),
                mask.shape(),
                "mask must broadcast to the tensor",
            ));
        }
        mask.where_cond(&fill, self)
    }
}

struct WhereBackward {
    cond: Tensor,
    on_true: Tensor,
    on_false: Tensor,
}

impl Backward for WhereBackward {
    fn name(&self) -> &'static str {
        "where"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.on_true, &self.on_false]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let zero = Tensor::zeros(&[], g.dtype(), g.device())?;
        let gt = self.cond.where_cond(g, &zero)?;
        let gf = self.cond.where_cond(&zero, g)?;
        Ok(vec![
            Some(gt.sum_to_shape(self.on_true.shape())?),
            Some(gf.sum_to_shape(self.on_false.shape())?),
        ])
    }
}
