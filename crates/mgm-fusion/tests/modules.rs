//! Projectors, window cutting, mining's NaN handling, gates and adapters against plain f64
//! loops; bad input is an error that says what was wrong.

mod common;

use common::{gelu, var};

use mgm_fusion::mining::windows;
use mgm_fusion::{Gate, GateKind, ModalityAdapter, PatchInfoMining, Projector, ProjectorType};
use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Device, Tensor};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::randn(seed, shape, 0.0, 1.0, DType::F32, Device::Cpu).unwrap()
}

fn linear(w: &[f64], b: &[f64], x: &[f64], out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|j| b[j] + (0..inp).map(|c| w[j * inp + c] * x[c]).sum::<f64>())
        .collect()
}

#[test]
fn projector_types_parse_and_bad_names_are_errors() {
    assert_eq!(
        ProjectorType::parse("linear").unwrap(),
        ProjectorType::Linear
    );
    assert_eq!(
        ProjectorType::parse("identity").unwrap(),
        ProjectorType::Identity
    );
    assert_eq!(
        ProjectorType::parse("mlp3x_gelu").unwrap(),
        ProjectorType::Mlp { depth: 3 }
    );
    for bad in ["mlp0x_gelu", "mlpx_gelu", "mlp2x_relu", "resampler"] {
        let e = ProjectorType::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad) && e.contains("mlp2x_gelu"), "{e}");
    }
    let vs = VarStore::new_trainable(0);
    let e = Projector::load(&vs, ProjectorType::Identity, 4, 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("identity") && e.contains('5'), "{e}");
}

#[test]
fn mlp3x_gelu_projector_matches_plain_loops() {
    let vs = VarStore::new_trainable(1);
    let p = Projector::load(&vs, ProjectorType::Mlp { depth: 3 }, 5, 7).unwrap();
    let x = randn(2, &[2, 3, 5]);
    let y = p.forward(&x).unwrap().to_vec_f64().unwrap();
    let xs = x.to_vec_f64().unwrap();
    for r in 0..6 {
        let mut h = xs[r * 5..(r + 1) * 5].to_vec();
        for (i, name) in ["0", "2", "4"].iter().enumerate() {
            h = linear(
                &var(&vs, &format!("{name}.weight")),
                &var(&vs, &format!("{name}.bias")),
                &h,
                7,
            );
            if i < 2 {
                h.iter_mut().for_each(|v| *v = gelu(*v));
            }
        }
        for c in 0..7 {
            assert!(
                (y[r * 7 + c] - h[c]).abs() < 1e-5 * (1.0 + h[c].abs()),
                "row {r} col {c}"
            );
        }
    }
    let e = p.forward(&randn(0, &[2, 4])).unwrap_err().to_string();
    assert!(e.contains("[2, 4]") && e.contains("input width 5"), "{e}");
}

#[test]
fn windows_follow_the_mgm_layout() {
    let (b, c, g, m) = (2, 3, 3, 2);
    let x = randn(4, &[b, c, g * m, g * m]);
    let w = windows(&x, g).unwrap();
    assert_eq!(w.shape(), &[b, g * g, m * m, c]);
    let (xs, ws) = (x.to_vec_f64().unwrap(), w.to_vec_f64().unwrap());
    let hw = g * m;
    for bi in 0..b {
        for pr in 0..g {
            for pc in 0..g {
                for ir in 0..m {
                    for ic in 0..m {
                        for ch in 0..c {
                            let want = xs[((bi * c + ch) * hw + pr * m + ir) * hw + pc * m + ic];
                            let at = (((bi * g * g) + pr * g + pc) * m * m + ir * m + ic) * c + ch;
                            assert_eq!(ws[at], want);
                        }
                    }
                }
            }
        }
    }
    let e = windows(&randn(0, &[1, 3, 6, 6]), 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("6 x 6") && e.contains("4 x 4"), "{e}");
}

#[test]
fn mining_replaces_nan_scores_by_zero() {
    // one channel of token 0 is NaN: its query (LayerNorm over all channels) and so all its
    // scores are NaN; as zeros they give a uniform softmax, so every other channel of the
    // output is x_lr + the window's mean value row, finite
    let (d, hd, g, m) = (4, 6, 2, 2);
    let vs = VarStore::new_trainable(9);
    let mining = PatchInfoMining::load(&vs, d, hd).unwrap();
    let mut x = randn(1, &[1, g * g, d]).to_vec::<f32>().unwrap();
    x[1] = f32::NAN;
    let x_lr = Tensor::from_vec(x.clone(), &[1, g * g, d]).unwrap();
    let x_hr = randn(2, &[1, hd, g * m, g * m]);
    let y = mining.forward(&x_lr, &x_hr).unwrap().to_vec_f64().unwrap();
    assert!(
        y[1].is_nan(),
        "the NaN channel stays NaN through the residual"
    );
    let win = windows(&x_hr, g).unwrap().to_vec_f64().unwrap(); // [1, 4, 4, hd]
    let (lw, lb) = (
        var(&vs, "vlm_uni_val_projector.0.weight"),
        var(&vs, "vlm_uni_val_projector.0.bias"),
    );
    let (fw, fb) = (
        var(&vs, "vlm_uni_val_projector.1.weight"),
        var(&vs, "vlm_uni_val_projector.1.bias"),
    );
    let mut mean = vec![0f64; d];
    for kk in 0..m * m {
        let px = &win[kk * hd..(kk + 1) * hd];
        let mu = px.iter().sum::<f64>() / hd as f64;
        let var_ = px.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / hd as f64;
        let n: Vec<f64> = (0..hd)
            .map(|c| (px[c] - mu) / (var_ + 1e-5).sqrt() * lw[c] + lb[c])
            .collect();
        for (o, v) in mean.iter_mut().zip(linear(&fw, &fb, &n, d)) {
            *o += v / (m * m) as f64;
        }
    }
    for c in [0, 2, 3] {
        let want = f64::from(x[c]) + mean[c];
        assert!(
            (y[c] - want).abs() < 1e-5 * (1.0 + want.abs()),
            "channel {c}: {} vs {want}",
            y[c]
        );
    }
    assert!(
        y[d..].iter().all(|v| v.is_finite()),
        "other tokens are untouched by the NaN"
    );
    let e = mining
        .forward(&randn(0, &[1, 3, d]), &x_hr)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 low-res tokens are not a square grid"), "{e}");
    let e = mining
        .forward(&x_lr, &randn(0, &[1, 5, 4, 4]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[1, 5, 4, 4]") && e.contains("[1, 6, H, W]"),
        "{e}"
    );
}

#[test]
fn gates_weigh_the_branch_and_start_closed() {
    let vs = VarStore::new_trainable(0);
    let x = randn(1, &[2, 3]);
    let y = randn(2, &[2, 3]);
    let (xs, ys) = (x.to_vec_f64().unwrap(), y.to_vec_f64().unwrap());
    let fixed = Gate::load(&vs, GateKind::Fixed(0.25), 3, 0.5).unwrap();
    let out = fixed.forward(&x, &y).unwrap().to_vec_f64().unwrap();
    for i in 0..6 {
        assert!((out[i] - (0.5 * xs[i] + 0.25 * ys[i])).abs() < 1e-6);
    }
    let learned = Gate::load(&vs.pp("g"), GateKind::Vector, 3, 1.0).unwrap();
    let out = learned.forward(&x, &y).unwrap().to_vec_f64().unwrap();
    assert_eq!(
        out, xs,
        "tanh(0) = 0: a new learned gate passes the residual only"
    );
    let e = fixed
        .forward(&x, &randn(0, &[3, 2]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
}

#[test]
fn adapter_maps_into_the_shared_width() {
    let vs = VarStore::new_trainable(4);
    let a = ModalityAdapter::load(&vs, 3, 4).unwrap();
    let x = randn(5, &[2, 3]);
    let y = a.forward(&x).unwrap().to_vec_f64().unwrap();
    let xs = x.to_vec_f64().unwrap();
    for r in 0..2 {
        let h: Vec<f64> = linear(
            &var(&vs, "fc1.weight"),
            &var(&vs, "fc1.bias"),
            &xs[r * 3..r * 3 + 3],
            4,
        )
        .into_iter()
        .map(gelu)
        .collect();
        let o = linear(&var(&vs, "fc2.weight"), &var(&vs, "fc2.bias"), &h, 4);
        for c in 0..4 {
            assert!((y[r * 4 + c] - o[c]).abs() < 1e-5 * (1.0 + o[c].abs()));
        }
    }
}
