//! Seeded random tensors: the same seed gives the same numbers on every machine.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::{DType, Device, Error, Result, Tensor};

impl Tensor {
    /// Normal samples with `mean` and `std`, generated in f64 from ChaCha8 seeded with `seed`.
    pub fn randn(
        seed: u64,
        shape: &[usize],
        mean: f64,
        std: f64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        device.ensure_available("randn")?;
        let dist = Normal::new(mean, std).map_err(|e| {
            Error::invalid_shape("randn", shape, format!("mean {mean}, std {std}: {e}"))
        })?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| dist.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape)?.to_dtype(dtype)
    }

    /// Uniform samples in `[lo, hi)`, generated in f64 from ChaCha8 seeded with `seed`.
    pub fn rand_uniform(
        seed: u64,
        shape: &[usize],
        lo: f64,
        hi: f64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        device.ensure_available("rand_uniform")?;
        let dist = Uniform::new(lo, hi).map_err(|e| {
            Error::invalid_shape("rand_uniform", shape, format!("range [{lo}, {hi}): {e}"))
        })?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| dist.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape)?.to_dtype(dtype)
    }
}
