//! Element types.

use half::{bf16, f16};

use crate::storage::CpuStorage;

/// The element type of a tensor.
///
/// `F64` is not needed by models; it exists so that gradient checks and references can run the
/// same ops in double precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
    /// 16-bit IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 64-bit integer (token ids, indices).
    I64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned byte; also the result of comparisons (0 or 1).
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// True for the floating-point dtypes.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    /// True for the 16-bit floats that compute in f32 internally.
    pub fn is_half(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }

    /// Lower-case name as PyTorch prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be the element of a tensor.
pub trait WithDType:
    bytemuck::Pod + Copy + Send + Sync + PartialOrd + std::fmt::Debug + 'static
{
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts to f64 (exact for every type but i64 beyond 2^53).
    fn to_f64(self) -> f64;
    /// Converts from f64, rounding (floats) or truncating toward zero and saturating (integers).
    fn from_f64(v: f64) -> Self;
    /// Converts to f32.
    fn to_f32(self) -> f32;
    /// Converts from f32.
    fn from_f32(v: f32) -> Self;
    /// Wraps a vector as storage.
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! with_dtype_int {
    ($t:ty, $d:ident, $v:ident) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$d;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$v(v)
            }
        }
    };
}
with_dtype_int!(i64, I64, I64);
with_dtype_int!(u32, U32, U32);
with_dtype_int!(u8, U8, U8);

impl WithDType for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl WithDType for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

macro_rules! with_dtype_half {
    ($t:ty, $d:ident) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$d;
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$d(v)
            }
        }
    };
}
with_dtype_half!(f16, F16);
with_dtype_half!(bf16, BF16);

/// The float types ops compute in: f32 (also for f16/bf16) and f64. Kernels are written once,
/// generic over this trait.
pub trait Float:
    WithDType
    + Default
    + std::iter::Sum
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
{
    /// Converts a literal.
    fn c(v: f64) -> Self {
        <Self as WithDType>::from_f64(v)
    }
    /// 0
    fn zero() -> Self;
    /// 1
    fn one() -> Self;
    /// +inf
    fn infinity() -> Self;
    /// -inf
    fn neg_infinity() -> Self;
    /// e^x
    fn exp(self) -> Self;
    /// natural log
    fn ln(self) -> Self;
    /// square root
    fn sqrt(self) -> Self;
    /// hyperbolic tangent
    fn tanh(self) -> Self;
    /// x^e
    fn powf(self, e: Self) -> Self;
    /// |x|
    fn abs(self) -> Self;
    /// sine
    fn sin(self) -> Self;
    /// cosine
    fn cos(self) -> Self;
    /// floor
    fn floor(self) -> Self;
    /// a * b + c with one rounding
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// NaN test
    fn is_nan(self) -> bool;
    /// neither inf nor NaN
    fn is_finite(self) -> bool;
    /// Error function (PyTorch's erf), needed for exact GELU.
    fn erf(self) -> Self;
}

macro_rules! float_impl {
    ($t:ident, $erf:path) => {
        impl Float for $t {
            fn zero() -> Self {
                0.0
            }
            fn one() -> Self {
                1.0
            }
            fn infinity() -> Self {
                $t::INFINITY
            }
            fn neg_infinity() -> Self {
                $t::NEG_INFINITY
            }
            fn exp(self) -> Self {
                $t::exp(self)
            }
            fn ln(self) -> Self {
                $t::ln(self)
            }
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            fn tanh(self) -> Self {
                $t::tanh(self)
            }
            fn powf(self, e: Self) -> Self {
                $t::powf(self, e)
            }
            fn abs(self) -> Self {
                $t::abs(self)
            }
            fn sin(self) -> Self {
                $t::sin(self)
            }
            fn cos(self) -> Self {
                $t::cos(self)
            }
            fn floor(self) -> Self {
                $t::floor(self)
            }
            fn mul_add(self, a: Self, b: Self) -> Self {
                $t::mul_add(self, a, b)
            }
            fn is_nan(self) -> bool {
                $t::is_nan(self)
            }
            fn is_finite(self) -> bool {
                $t::is_finite(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
        }
    };
}
float_impl!(f32, libm::erff);
float_impl!(f64, libm::erf);
