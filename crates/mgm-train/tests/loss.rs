//! The losses against plain f64 loops written from their definitions, and their gradients
//! against central differences.

use mgm_tensor::{DType, Device, Tensor, Var};
use mgm_train::loss::{AdaptiveWeights, IGNORE_INDEX, causal_lm_loss, info_nce, l2};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::randn(seed, shape, 0.0, 1.0, DType::F32, Device::Cpu).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

/// -log softmax(row)[k] in f64.
fn nll(row: &[f64], k: usize) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    lse - row[k]
}

#[test]
fn causal_lm_loss_is_the_shifted_smoothed_cross_entropy() {
    let (b, t, v) = (2, 6, 7);
    let logits = randn(1, &[b, t, v]);
    let labels: Vec<i64> = vec![
        IGNORE_INDEX,
        IGNORE_INDEX,
        3,
        1,
        6,
        0, //
        IGNORE_INDEX,
        2,
        5,
        IGNORE_INDEX,
        4,
        4,
    ];
    let lab = Tensor::from_vec(labels.clone(), &[b, t]).unwrap();
    let x = f64s(&logits);
    for eps in [0.0, 0.1] {
        let got = causal_lm_loss(&logits, &lab, eps)
            .unwrap()
            .to_scalar_f64()
            .unwrap();
        let (mut sum, mut n) = (0.0, 0);
        for r in 0..b {
            for p in 0..t - 1 {
                let y = labels[r * t + p + 1];
                if y == IGNORE_INDEX {
                    continue;
                }
                let row = &x[(r * t + p) * v..][..v];
                // (1 - eps) * nll(y) + eps * mean over classes of nll(c)
                let smooth = (0..v).map(|c| nll(row, c)).sum::<f64>() / v as f64;
                sum += (1.0 - eps) * nll(row, y as usize) + eps * smooth;
                n += 1;
            }
        }
        let want = sum / n as f64;
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want),
            "eps {eps}: {got} vs {want}"
        );
    }
    let e = causal_lm_loss(
        &logits,
        &Tensor::from_vec(vec![0i64; 6], &[1, 6]).unwrap(),
        0.0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("[B, T, V]"), "{e}");
}

#[test]
fn info_nce_matches_its_definition_and_its_gradient_a_finite_difference() {
    let (n, d, temp) = (5, 4, 0.07);
    let a = randn(2, &[n, d]);
    let b = randn(3, &[n, d]);
    let reference = |av: &[f64], bv: &[f64]| -> f64 {
        let unit = |v: &[f64]| -> Vec<Vec<f64>> {
            v.chunks(d)
                .map(|r| {
                    let s = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                    r.iter().map(|x| x / s).collect()
                })
                .collect()
        };
        let (ua, ub) = (unit(av), unit(bv));
        let sim =
            |i: usize, j: usize| ua[i].iter().zip(&ub[j]).map(|(x, y)| x * y).sum::<f64>() / temp;
        let mut total = 0.0;
        for i in 0..n {
            let row: Vec<f64> = (0..n).map(|j| sim(i, j)).collect();
            let col: Vec<f64> = (0..n).map(|j| sim(j, i)).collect();
            total += nll(&row, i) + nll(&col, i);
        }
        total / (2.0 * n as f64)
    };
    let got = info_nce(&a, &b, temp).unwrap().to_scalar_f64().unwrap();
    let want = reference(&f64s(&a), &f64s(&b));
    assert!((got - want).abs() <= 1e-5 * (1.0 + want), "{got} vs {want}");
    // d loss / d a[1][2]
    let va = Var::from_tensor(&a).unwrap();
    info_nce(&va.as_tensor(), &b, temp)
        .unwrap()
        .backward()
        .unwrap();
    let g = f64::from(va.grad().unwrap().to_vec::<f32>().unwrap()[d + 2]);
    let mut av = f64s(&a);
    let h = 1e-4;
    av[d + 2] += h;
    let up = reference(&av, &f64s(&b));
    av[d + 2] -= 2.0 * h;
    let down = reference(&av, &f64s(&b));
    let numeric = (up - down) / (2.0 * h);
    assert!(
        (g - numeric).abs() <= 1e-3 * (1.0 + numeric.abs()),
        "{g} vs {numeric}"
    );
    assert!(info_nce(&a, &b, 0.0).is_err() && info_nce(&a, &randn(4, &[n, d + 1]), temp).is_err());
}

#[test]
fn l2_and_adaptive_weights() {
    let w = Var::from_tensor(&Tensor::from_vec(vec![1f32, -2.0, 3.0], &[3]).unwrap()).unwrap();
    let v = l2(&[&w], 0.5).unwrap().to_scalar_f64().unwrap();
    assert!((v - 7.0).abs() < 1e-9, "{v}");
    let mut aw = AdaptiveWeights::new(&["text", "image"], 1.0);
    aw.update(&[1.0, 3.0]).unwrap();
    // (L_i / mean)^1 = 0.5, 1.5; mean 1 already
    let w: Vec<f64> = aw.weights().iter().map(|x| x.1).collect();
    assert!(
        (w[0] - 0.5).abs() < 1e-12 && (w[1] - 1.5).abs() < 1e-12,
        "{w:?}"
    );
    let total = aw
        .combine(&[Tensor::scalar(2f32), Tensor::scalar(4f32)])
        .unwrap()
        .to_scalar_f64()
        .unwrap();
    assert!((total - 7.0).abs() < 1e-6);
    assert!(aw.update(&[1.0]).is_err() && aw.update(&[1.0, f64::NAN]).is_err());
}
