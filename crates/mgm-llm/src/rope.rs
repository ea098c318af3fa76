//! Rotary position embeddings as transformers 5.23 computes them (`modeling_rope_utils`):
//! inverse frequencies in f32 for the `default`, `linear`, `dynamic` and `llama3` rope types,
//! `freqs = position * inv_freq` in f32, and the `rotate_half` convention (the first half of a
//! head's dims pairs with the second half, not interleaved pairs).
//!
//! `dynamic` keeps state like transformers' `dynamic_rope_update`: a forward call whose largest
//! position `p` gives `p + 1 > ` the longest length seen so far recomputes the base for that
//! length; a call shorter than `max_position_embeddings` after growth resets to the original
//! frequencies. [`RopeState`] carries that state (one per generation, inside the KV cache).
//!
//! ```
//! use mgm_llm::config::RopeScaling;
//! use mgm_llm::rope::Rope;
//! let rope = Rope::new(8, 10_000.0, RopeScaling::Default, 2048);
//! let mut head = [1f32, 0., 0., 0., 0., 0., 0., 0.];
//! rope.rotate(&rope.initial_state(), &mut head, 1); // position 1
//! assert!((head[0] - 1f32.cos()).abs() < 1e-6 && (head[4] - 1f32.sin()).abs() < 1e-6);
//! ```

use mgm_tensor::Tensor;

use crate::Result;
use crate::config::RopeScaling;

/// The rotary embedding of one model.
#[derive(Clone, Debug)]
pub struct Rope {
    /// Rotated dims per head (even).
    dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
    /// The frequencies before any dynamic growth.
    original: Vec<f32>,
}

/// The frequencies in use (changes only for the `dynamic` rope type).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeState {
    inv_freq: Vec<f32>,
    max_seq_len_cached: usize,
}

/// `1 / base^(2i / dim)` as torch computes it in f32.
fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            (1.0 / base.powf(f64::from(e))) as f32
        })
        .collect()
}

impl Rope {
    /// The rotary embedding of `dim` rotated dims per head.
    pub fn new(
        dim: usize,
        theta: f64,
        scaling: RopeScaling,
        max_position_embeddings: usize,
    ) -> Rope {
        let mut inv = default_inv_freq(theta, dim);
        match scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv {
                    *f = (f64::from(*f) / factor) as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in &mut inv {
                    let freq = f64::from(*f);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        freq
                    };
                    // wavelengths are finite and positive here, so this is transformers'
                    // `~(wavelen < high) & ~(wavelen > low)`
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    let out = if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                    *f = out as f32;
                }
            }
        }
        Rope {
            dim,
            theta,
            scaling,
            max_position_embeddings,
            original: inv,
        }
    }

    /// Rotated dims per head.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The frequencies before any call.
    pub fn initial_state(&self) -> RopeState {
        RopeState {
            inv_freq: self.original.clone(),
            max_seq_len_cached: self.max_position_embeddings,
        }
    }

    /// Updates `state` for a call whose largest position is `max_pos` (dynamic rope only).
    pub fn update(&self, state: &mut RopeState, max_pos: usize) {
        let RopeScaling::Dynamic { factor } = self.scaling else {
            return;
        };
        let seq_len = max_pos + 1;
        let orig = self.max_position_embeddings;
        if seq_len > state.max_seq_len_cached {
            let (d, len) = (self.dim as f64, seq_len.max(orig) as f64);
            let base =
                self.theta * ((factor * len / orig as f64) - (factor - 1.0)).powf(d / (d - 2.0));
            state.inv_freq = default_inv_freq(base, self.dim);
            state.max_seq_len_cached = seq_len;
        }
        if seq_len < orig && state.max_seq_len_cached > orig {
            state.inv_freq = self.original.clone();
            state.max_seq_len_cached = orig;
        }
    }

    /// `(cos, sin)` of `pos * inv_freq` (the f32 product, as torch forms it), `dim / 2` each.
    pub fn cos_sin(&self, state: &RopeState, pos: usize) -> (Vec<f32>, Vec<f32>) {
        state
            .inv_freq
            .iter()
            .map(|&f| {
                let a = f64::from(pos as f32 * f);
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip()
    }

    /// Rotates one head (`head.len()` = head_dim >= dim) at position `pos` in place:
    /// `x[i] cos - x[i + d/2] sin`, `x[i + d/2] cos + x[i] sin` over the rotated dims.
    pub fn rotate(&self, state: &RopeState, head: &mut [f32], pos: usize) {
        let (cos, sin) = self.cos_sin(state, pos);
        rotate_with(head, &cos, &sin);
    }

    /// The rotation as tensor ops, for autograd: `x` `[B, T, H, D]`, `positions` one per
    /// (batch row, token), `B * T` of them.
    pub fn rotate_tensor(
        &self,
        state: &RopeState,
        x: &Tensor,
        positions: &[usize],
    ) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, t, d) = (s[0], s[1], s[3]);
        let half = self.dim / 2;
        let (mut cs, mut sn) = (
            Vec::with_capacity(b * t * half),
            Vec::with_capacity(b * t * half),
        );
        for &p in positions {
            let (c, si) = self.cos_sin(state, p);
            cs.extend(c);
            sn.extend(si);
        }
        let cos = Tensor::from_vec(cs, &[b, t, 1, half])?.to_dtype(x.dtype())?;
        let sin = Tensor::from_vec(sn, &[b, t, 1, half])?.to_dtype(x.dtype())?;
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let r1 = x1.mul(&cos)?.sub(&x2.mul(&sin)?)?;
        let r2 = x2.mul(&cos)?.add(&x1.mul(&sin)?)?;
        let mut parts = vec![r1, r2];
        if self.dim < d {
            parts.push(x.narrow(3, self.dim, d - self.dim)?);
        }
        Ok(Tensor::cat(&parts, 3)?)
    }
}

/// The rotation of one head with precomputed `cos` / `sin` (`dim / 2` each).
#[inline]
pub(crate) fn rotate_with(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, rest) = head.split_at_mut(half);
    let b = &mut rest[..half];
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_the_formula() {
        let r = Rope::new(8, 10_000.0, RopeScaling::Default, 16);
        let s = r.initial_state();
        for (i, &f) in s.inv_freq.iter().enumerate() {
            let want = 10_000f64.powf(-(2.0 * i as f64) / 8.0);
            assert!(
                (f64::from(f) - want).abs() <= 1e-7 * want,
                "{i}: {f} vs {want}"
            );
        }
    }

    #[test]
    fn llama3_scales_only_long_wavelengths() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16.0,
        };
        let base = Rope::new(16, 10_000.0, RopeScaling::Default, 64).initial_state();
        let r = Rope::new(16, 10_000.0, scaling, 64).initial_state();
        // the lowest frequency (wavelength > 16 / 1) is divided by 8; the highest (wavelength
        // 2 pi, between 16 / 4 and 16) is smoothed: s = (16 / 2 pi - 1) / 3
        let last = base.inv_freq.len() - 1;
        assert!((r.inv_freq[last] - base.inv_freq[last] / 8.0).abs() < 1e-9);
        let s = (16.0 / (2.0 * std::f64::consts::PI) - 1.0) / 3.0;
        let want = (1.0 - s) / 8.0 + s;
        assert!(
            (f64::from(r.inv_freq[0]) - want).abs() < 1e-6,
            "{}",
            r.inv_freq[0]
        );
        // wavelengths below 16 / 4 would be kept: none here, as inv_freq <= 1
    }

    #[test]
    fn dynamic_grows_past_the_context_and_resets_below_it() {
        let r = Rope::new(8, 10_000.0, RopeScaling::Dynamic { factor: 2.0 }, 8);
        let mut s = r.initial_state();
        r.update(&mut s, 5);
        assert_eq!(s, r.initial_state());
        r.update(&mut s, 11); // length 12 > 8: base grows
        assert!(s.inv_freq[1] < r.initial_state().inv_freq[1]);
        assert_eq!(s.max_seq_len_cached, 12);
        r.update(&mut s, 3);
        assert_eq!(s, r.initial_state());
    }

    #[test]
    fn rotation_tensor_matches_slices() {
        let r = Rope::new(4, 100.0, RopeScaling::Default, 16);
        let st = r.initial_state();
        let data: Vec<f32> = (0..2 * 3 * 6).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data.clone(), &[2, 3, 1, 6]).unwrap();
        let pos = [0, 1, 2, 4, 5, 6];
        let got = r
            .rotate_tensor(&st, &x, &pos)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        for (row, &p) in pos.iter().enumerate() {
            let mut h = data[row * 6..row * 6 + 6].to_vec();
            r.rotate(&st, &mut h, p);
            assert_eq!(&got[row * 6..row * 6 + 6], &h[..]);
        }
    }
}
