//! Helpers shared by the mgm-fusion tests: a trainable store's parameter values, and the f64
//! activation the plain-loop references use.
#![allow(dead_code)] // each test file uses its own subset

use mgm_tensor::nn::VarStore;

/// The current value of the var `name` (full name) of a trainable store, in f64.
pub fn var(vs: &VarStore, name: &str) -> Vec<f64> {
    vs.all_vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} is a var"))
        .1
        .as_tensor()
        .to_vec_f64()
        .unwrap()
}

/// Exact GELU in f64.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}
