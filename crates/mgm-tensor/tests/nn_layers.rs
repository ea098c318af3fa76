//! The `nn` layers (Linear, Embedding, LayerNorm, RmsNorm plain and Gemma, Conv2d) against plain
//! f64 loops, loaded through a VarStore by checkpoint names, with gradients checked by finite
//! differences and errors that name the layer and the shapes.
mod common;
use std::collections::HashMap;

use common::*;
use mgm_tensor::nn::{Conv2d, Embedding, LayerNorm, Linear, Module, Param, RmsNorm, VarStore};
use mgm_tensor::{Conv2dParams, DType, Device, Tensor};

fn t64(seed: u64, shape: &[usize], scale: f64) -> Tensor {
    Tensor::from_vec(values(seed, shape.iter().product(), scale), shape).unwrap()
}

fn store(entries: &[(&str, &Tensor)]) -> VarStore {
    let map: HashMap<String, Tensor> = entries
        .iter()
        .map(|(n, t)| (n.to_string(), (*t).clone()))
        .collect();
    VarStore::from_tensors(map).unwrap()
}

#[test]
fn linear_matches_loop_reference_on_batched_input() {
    let (i_f, o_f) = (5, 3);
    let x = t64(1, &[2, 4, i_f], 1.0);
    let w = t64(2, &[o_f, i_f], 1.0);
    let b = t64(3, &[o_f], 1.0);
    let vs = store(&[("proj.weight", &w), ("proj.bias", &b)]);
    let lin = Linear::load(&vs.pp("proj"), i_f, o_f, true).unwrap();
    vs.finish().unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.shape(), &[2, 4, o_f]);
    let (xv, wv, bv) = (
        x.to_vec_f64().unwrap(),
        w.to_vec_f64().unwrap(),
        b.to_vec_f64().unwrap(),
    );
    let mut expect = Vec::new();
    for r in 0..8 {
        for o in 0..o_f {
            let mut acc = bv[o];
            for k in 0..i_f {
                acc += xv[r * i_f + k] * wv[o * i_f + k];
            }
            expect.push(acc);
        }
    }
    assert_close(&y.to_vec_f64().unwrap(), &expect, "linear");

    // without bias, f32, through a transposed input view
    let lin = Linear::new(w.to_dtype(DType::F32).unwrap(), None).unwrap();
    let xt = x.to_dtype(DType::F32).unwrap().transpose(0, 1).unwrap();
    let y = lin.forward(&xt).unwrap().transpose(0, 1).unwrap();
    let mut expect_nb = expect.clone();
    for (i, e) in expect_nb.iter_mut().enumerate() {
        *e -= bv[i % o_f];
    }
    assert_close(&y.to_vec_f64().unwrap(), &expect_nb, "linear no bias f32");
}

#[test]
fn embedding_layer_reads_rows() {
    let w = t64(4, &[6, 3], 1.0);
    let emb = Embedding::load(
        &store(&[("embed_tokens.weight", &w)]).pp("embed_tokens"),
        6,
        3,
    )
    .unwrap();
    let ids = Tensor::from_vec(vec![5i64, 0, 5], &[1, 3]).unwrap();
    let y = emb.forward(&ids).unwrap();
    assert_eq!(y.shape(), &[1, 3, 3]);
    let wv = w.to_vec_f64().unwrap();
    let expect: Vec<f64> = [5usize, 0, 5]
        .iter()
        .flat_map(|&i| wv[i * 3..i * 3 + 3].to_vec())
        .collect();
    assert_eq!(y.to_vec_f64().unwrap(), expect);
}

fn ref_norm(x: &[f64], n: usize, eps: f64, rms: bool, scale: &[f64], shift: &[f64]) -> Vec<f64> {
    let mut out = Vec::new();
    for row in x.chunks(n) {
        let mean = if rms {
            0.0
        } else {
            row.iter().sum::<f64>() / n as f64
        };
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (j, v) in row.iter().enumerate() {
            out.push((v - mean) * inv * scale[j] + shift[j]);
        }
    }
    out
}

#[test]
fn layer_norm_and_rms_norm_layers_match_loops() {
    let n = 7;
    let x = t64(5, &[3, n], 2.0);
    let w = t64(6, &[n], 1.0);
    let b = t64(7, &[n], 1.0);
    let xv = x.to_vec_f64().unwrap();
    let (wv, bv) = (w.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let zeros = vec![0.0; n];

    let ln = LayerNorm::load(
        &store(&[("ln.weight", &w), ("ln.bias", &b)]).pp("ln"),
        n,
        1e-5,
    )
    .unwrap();
    assert_close(
        &ln.forward(&x).unwrap().to_vec_f64().unwrap(),
        &ref_norm(&xv, n, 1e-5, false, &wv, &bv),
        "layer_norm",
    );
    let ln_nb = LayerNorm::load_no_bias(&store(&[("weight", &w)]), n, 1e-6).unwrap();
    assert_close(
        &ln_nb.forward(&x).unwrap().to_vec_f64().unwrap(),
        &ref_norm(&xv, n, 1e-6, false, &wv, &zeros),
        "layer_norm no bias",
    );

    let rms = RmsNorm::load(&store(&[("norm.weight", &w)]).pp("norm"), n, 1e-6).unwrap();
    assert_close(
        &rms.forward(&x).unwrap().to_vec_f64().unwrap(),
        &ref_norm(&xv, n, 1e-6, true, &wv, &zeros),
        "rms_norm",
    );
    let gemma = RmsNorm::load_gemma(&store(&[("norm.weight", &w)]).pp("norm"), n, 1e-6).unwrap();
    let w1: Vec<f64> = wv.iter().map(|v| 1.0 + v).collect();
    assert_close(
        &gemma.forward(&x).unwrap().to_vec_f64().unwrap(),
        &ref_norm(&xv, n, 1e-6, true, &w1, &zeros),
        "gemma rms_norm",
    );

    // Gemma on bf16: 1 + w is formed in f32 (a bf16 `1 + w` would lose w's low bits)
    let xb = x.to_dtype(DType::BF16).unwrap();
    let wb = w.to_dtype(DType::BF16).unwrap();
    let gemma_b = RmsNorm::new(wb.clone(), 1e-6, true).unwrap();
    let y = gemma_b.forward(&xb).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let wbv: Vec<f64> = wb.to_vec_f64().unwrap().iter().map(|v| 1.0 + v).collect();
    assert_close_tol(
        &y.to_vec_f64().unwrap(),
        &ref_norm(&xb.to_vec_f64().unwrap(), n, 1e-6, true, &wbv, &zeros),
        1e-2,
        "gemma rms_norm bf16",
    );
}

/// Plain-loop conv2d over [N, C, H, W] in f64.
#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    b: Option<&[f64]>,
    p: Conv2dParams,
) -> (Vec<f64>, [usize; 4]) {
    let [n, c, h, wd] = xs;
    let [co, cig, kh, kw] = ws;
    let oh = (h + 2 * p.padding.0 - p.dilation.0 * (kh - 1) - 1) / p.stride.0 + 1;
    let ow = (wd + 2 * p.padding.1 - p.dilation.1 * (kw - 1) - 1) / p.stride.1 + 1;
    let opg = co / p.groups;
    let mut out = vec![0.0; n * co * oh * ow];
    for bi in 0..n {
        for o in 0..co {
            let g = o / opg;
            for y in 0..oh {
                for xo in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[o]);
                    for ci in 0..cig {
                        let cin = g * cig + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y * p.stride.0 + ky * p.dilation.0) as isize
                                    - p.padding.0 as isize;
                                let ix = (xo * p.stride.1 + kx * p.dilation.1) as isize
                                    - p.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                acc += x[((bi * c + cin) * h + iy as usize) * wd + ix as usize]
                                    * w[((o * cig + ci) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    out[((bi * co + o) * oh + y) * ow + xo] = acc;
                }
            }
        }
        let _ = c;
    }
    (out, [n, co, oh, ow])
}

#[test]
fn conv2d_layer_matches_loop_reference() {
    for (groups, stride, padding, dilation, bias) in [
        (1, (1, 1), (0, 0), (1, 1), true),
        (2, (2, 1), (1, 2), (1, 1), false),
        (4, (1, 1), (3, 3), (1, 1), true), // depthwise, ConvNeXt-style
        (1, (2, 2), (1, 1), (2, 1), true),
    ] {
        let p = Conv2dParams {
            stride,
            padding,
            dilation,
            groups,
        };
        let (cin, cout, k) = (4, 4, if groups == 4 { 7 } else { 3 });
        let x = t64(8, &[2, cin, 9, 8], 1.0);
        let w = t64(9, &[cout, cin / groups, k, k], 0.5);
        let b = t64(10, &[cout], 0.5);
        let vs = if bias {
            store(&[("conv.weight", &w), ("conv.bias", &b)])
        } else {
            store(&[("conv.weight", &w)])
        };
        let conv = Conv2d::load(&vs.pp("conv"), cin, cout, (k, k), p, bias).unwrap();
        vs.finish().unwrap();
        let y = conv.forward(&x).unwrap();
        let bv = b.to_vec_f64().unwrap();
        let (expect, shape) = ref_conv(
            &x.to_vec_f64().unwrap(),
            [2, cin, 9, 8],
            &w.to_vec_f64().unwrap(),
            [cout, cin / groups, k, k],
            bias.then_some(&bv[..]),
            p,
        );
        assert_eq!(y.shape(), &shape, "{p:?}");
        assert_close(&y.to_vec_f64().unwrap(), &expect, &format!("conv2d {p:?}"));
    }
}

#[test]
fn layer_gradients_match_finite_differences() {
    let x = t64(11, &[2, 3, 4], 1.0);
    let w = t64(12, &[5, 4], 1.0);
    let b = t64(13, &[5], 1.0);
    grad_check("Linear", &[x.clone(), w, b], &[true, true, true], |t| {
        Linear::new(t[1].clone(), Some(Param::Frozen(t[2].clone())))?.forward(&t[0])
    });
    let g = t64(14, &[4], 1.0);
    grad_check(
        "RmsNorm gemma",
        &[x.clone(), g.clone()],
        &[true, true],
        |t| RmsNorm::new(t[1].clone(), 1e-6, true)?.forward(&t[0]),
    );
    grad_check(
        "LayerNorm",
        &[x.clone(), g.clone(), g],
        &[true, true, true],
        |t| {
            LayerNorm::new(
                Some(Param::Frozen(t[1].clone())),
                Some(Param::Frozen(t[2].clone())),
                1e-5,
            )
            .forward(&t[0])
        },
    );
    let table = t64(15, &[4, 3], 1.0);
    let ids = Tensor::from_vec(vec![3i64, 3, 0], &[3]).unwrap();
    grad_check("Embedding", &[table], &[true], |t| {
        Embedding::new(t[0].clone())?.forward(&ids)
    });
    let img = t64(16, &[1, 2, 5, 5], 1.0);
    let cw = t64(17, &[2, 1, 3, 3], 1.0);
    let p = Conv2dParams {
        padding: (1, 1),
        groups: 2,
        ..Conv2dParams::default()
    };
    grad_check("Conv2d", &[img, cw], &[true, true], |t| {
        Conv2d::new(t[1].clone(), None, p)?.forward(&t[0])
    });
}

#[test]
fn trainable_layers_accumulate_gradients_in_their_vars() {
    let vs = VarStore::new_trainable(7);
    let lin = Linear::load(&vs.pp("fc"), 3, 2, true).unwrap();
    let x = Tensor::ones(&[4, 3], DType::F32, Device::Cpu).unwrap();
    for _ in 0..2 {
        lin.forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    }
    // d sum / d bias = number of rows, accumulated over two passes
    let gb = lin.bias().unwrap().var().unwrap().grad().unwrap();
    assert_eq!(gb.to_vec::<f32>().unwrap(), vec![8.0, 8.0]);
    let names: Vec<String> = vs.all_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"fc.weight".to_string()) && names.contains(&"fc.bias".to_string()));
}

#[test]
fn layer_errors_name_the_layer_and_shapes() {
    let w = Tensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap();
    let lin = Linear::new(w.clone(), None).unwrap();
    let e = lin
        .forward(&Tensor::zeros(&[2, 5], DType::F32, Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Linear") && e.contains("[2, 5]") && e.contains("[3, 4]"),
        "{e}"
    );
    let e = Linear::load(&store(&[("weight", &w)]), 3, 4, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weight") && e.contains("[4, 3]") && e.contains("[3, 4]"),
        "{e}"
    );
    let e = Linear::load(&store(&[("weight", &w)]).pp("fc"), 4, 3, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.weight") || e.contains("fc.bias"), "{e}");
    let e = Embedding::new(Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("Embedding") && e.contains("[4]"), "{e}");
    let e = Conv2d::load(
        &VarStore::new_trainable(0),
        3,
        4,
        (3, 3),
        Conv2dParams {
            groups: 2,
            ..Conv2dParams::default()
        },
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Conv2d") && e.contains("groups = 2"), "{e}");
}
