//! Loss scaling, resume, checkpoint failures and frozen parameters, on small models built here
//! (the PyTorch conformance of the optimizers is in tests/tests/train_conformance.rs).

use mgm_tensor::{DType, Device, Tensor, Var};
use mgm_train::checkpoint::{self, TrainerState};
use mgm_train::{GroupSpec, LossScaler, Optimizer, Schedule, Trainer};

fn randn(seed: u64, shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(seed, shape, 0.0, std, DType::F32, Device::Cpu).unwrap()
}

/// A two-layer MLP regression: its named parameters (fresh from `seed`).
fn mlp(seed: u64) -> Vec<(String, Var)> {
    vec![
        ("fc1.weight".into(), randn(seed, &[16, 4], 0.5)),
        ("fc1.bias".into(), randn(seed + 1, &[16], 0.1)),
        ("fc2.weight".into(), randn(seed + 2, &[2, 16], 0.25)),
        ("fc2.bias".into(), randn(seed + 3, &[2], 0.1)),
    ]
    .into_iter()
    .map(|(n, t)| (n, Var::from_tensor(&t).unwrap()))
    .collect()
}

fn forward(p: &[(String, Var)], x: &Tensor) -> mgm_train::Result<Tensor> {
    let t = |i: usize| p[i].1.as_tensor();
    let h = x.matmul(&t(0).t()?)?.add(&t(1))?.gelu()?;
    Ok(h.matmul(&t(2).t()?)?.add(&t(3))?)
}

/// Batch `step` of the synthetic task (a fixed nonlinear target), deterministic in `step`.
fn batch(step: u64) -> (Tensor, Tensor) {
    let x = randn(1000 + step, &[8, 4], 1.0);
    let v = x.to_vec::<f32>().unwrap();
    let y: Vec<f32> = v
        .chunks(4)
        .flat_map(|r| [r[0] * r[1] - r[2], (r[3]).sin() + 0.5 * r[0]])
        .collect();
    (x, Tensor::from_vec(y, &[8, 2]).unwrap())
}

fn trainer(params: &[(String, Var)]) -> Trainer {
    let opt = Optimizer::adamw(
        params.to_vec(),
        vec![
            GroupSpec::new("weights", &["*.weight"], 1e-2).betas(0.9, 0.98),
            GroupSpec::new("biases", &["*.bias"], 2e-2).weight_decay(0.0),
        ],
        &[],
    )
    .unwrap();
    let mut t = Trainer::new(
        opt,
        Schedule::WarmupCosine {
            warmup: 3,
            total: 20,
            min_ratio: 0.1,
        },
    );
    t.clip = Some(2.0);
    t
}

fn train(t: &mut Trainer, params: &[(String, Var)], steps: std::ops::Range<u64>) -> Vec<f64> {
    steps
        .map(|s| {
            let (x, y) = batch(s);
            t.step(&[1.0], |_| {
                Ok(forward(params, &x)?.sub(&y)?.sqr()?.mean_all()?)
            })
            .unwrap()
            .loss
        })
        .collect()
}

fn weights(params: &[(String, Var)]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor()))
        .collect()
}

#[test]
fn resume_continues_with_identical_losses() {
    let straight = mlp(1);
    let held_out = || {
        let (x, y) = batch(10_000);
        let l = forward(&straight, &x)
            .unwrap()
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap();
        l.mean_all().unwrap().to_scalar_f64().unwrap()
    };
    let before = held_out();
    let mut t = trainer(&straight);
    let all = train(&mut t, &straight, 0..20);
    let after = held_out();
    assert!(
        after < 0.8 * before,
        "the held-out loss falls over 20 steps: {before} -> {after}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let first = mlp(1);
    let mut t1 = trainer(&first);
    let mut resumed = train(&mut t1, &first, 0..10);
    let state = TrainerState {
        step: t1.step,
        scaler: None,
        extra: serde_json::json!({"next_batch": 10}),
    };
    checkpoint::save(tmp.path(), &weights(&first), &t1.opt, &state).unwrap();
    drop(t1);

    // a fresh process's view: other initial values, a new optimizer, then the checkpoint
    let second = mlp(99);
    let mut t2 = trainer(&second);
    let ckpt = checkpoint::latest(tmp.path())
        .unwrap()
        .expect("a checkpoint");
    let (state, _) = checkpoint::load(&ckpt, &mut t2.opt).unwrap();
    t2.step = state.step;
    let next = state.extra["next_batch"].as_u64().unwrap();
    resumed.extend(train(&mut t2, &second, next..20));
    assert_eq!(resumed, all, "10 + resume + 10 steps against 20 straight");
    for ((_, a), (_, b)) in straight.iter().zip(&second) {
        assert_eq!(
            a.as_tensor().to_vec::<f32>().unwrap(),
            b.as_tensor().to_vec::<f32>().unwrap()
        );
    }
}

#[test]
fn a_corrupt_checkpoint_is_an_error_and_a_failed_save_keeps_the_last_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let p = mlp(1);
    let mut t = trainer(&p);
    train(&mut t, &p, 0..2);
    let state = |step| TrainerState {
        step,
        scaler: None,
        extra: serde_json::Value::Null,
    };
    let good = checkpoint::save(tmp.path(), &weights(&p), &t.opt, &state(2)).unwrap();
    // a save that fails half-way (a name given twice) leaves `latest` and step-2 alone
    let mut dup = weights(&p);
    dup.push(dup[0].clone());
    let e = checkpoint::save(tmp.path(), &dup, &t.opt, &state(3)).unwrap_err();
    assert!(e.to_string().contains("given twice"), "{e}");
    assert_eq!(checkpoint::latest(tmp.path()).unwrap(), Some(good.clone()));
    assert!(!tmp.path().join("step-3").exists());
    checkpoint::load(&good, &mut trainer(&mlp(5)).opt).expect("the good one still loads");

    // truncated optimizer state and a broken trainer_state.json name their files
    let opt_file = good.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt_file).unwrap();
    std::fs::write(&opt_file, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&good, &mut trainer(&mlp(5)).opt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
    std::fs::write(good.join("trainer_state.json"), "{\"format\": ").unwrap();
    let e = checkpoint::load(&good, &mut trainer(&mlp(5)).opt)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trainer_state.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

#[test]
fn an_injected_f16_overflow_skips_exactly_that_step_and_halves_the_scale() {
    let w = Var::from_tensor(&randn(3, &[4], 0.5).to_dtype(DType::F16).unwrap()).unwrap();
    let x = randn(4, &[4], 1.0);
    let opt = Optimizer::adamw(
        vec![("w".into(), w.clone())],
        vec![GroupSpec::new("all", &[], 1e-2)],
        &[],
    )
    .unwrap();
    let mut t = Trainer::new(opt, Schedule::Constant);
    t.scaler = Some(LossScaler::new(1024.0, 3));
    let mut scales = Vec::new();
    for step in 0..8 {
        let before = w.as_tensor().to_vec_f64().unwrap();
        // step 4's loss is 1e4 times larger: its scaled f16 gradients overflow to inf
        let boost = if step == 4 { 1e4 } else { 1.0 };
        let r = t
            .step(&[1.0], |_| {
                let l = w.as_tensor().to_dtype(DType::F32)?.mul(&x)?.sum_all()?;
                Ok(l.mul_scalar(boost)?)
            })
            .unwrap();
        let after = w.as_tensor().to_vec_f64().unwrap();
        if step == 4 {
            let s = scales.last().copied().unwrap();
            assert_eq!(r.skipped, Some((s, s / 2.0)), "step 4 is skipped");
            assert_eq!(before, after, "a skipped step leaves the weights alone");
        } else {
            assert_eq!(r.skipped, None, "step {step}");
            assert_ne!(before, after, "step {step} updates");
        }
        scales.push(t.scaler.as_ref().unwrap().scale);
    }
    // three clean steps double it, the overflow halves it and restarts the count
    assert_eq!(
        scales,
        vec![
            1024.0, 1024.0, 2048.0, 2048.0, 1024.0, 1024.0, 1024.0, 2048.0
        ]
    );
}

#[test]
fn frozen_parameters_get_no_state_and_unmatched_ones_are_an_error() {
    let p = mlp(1);
    let opt = Optimizer::adamw(
        p.clone(),
        vec![GroupSpec::new("head", &["fc2.*"], 1e-2)],
        &["fc1.*"],
    )
    .unwrap();
    assert_eq!(opt.frozen(), vec!["fc1.weight", "fc1.bias"]);
    let before = p[0].1.as_tensor().to_vec::<f32>().unwrap();
    let mut t = Trainer::new(opt, Schedule::Constant);
    let (x, y) = batch(0);
    t.step(&[1.0], |_| {
        Ok(forward(&p, &x)?.sub(&y)?.sqr()?.mean_all()?)
    })
    .unwrap();
    assert_eq!(t.opt.params_with_state(), 2);
    assert_eq!(p[0].1.as_tensor().to_vec::<f32>().unwrap(), before);

    let e = Optimizer::adamw(p, vec![GroupSpec::new("head", &["fc2.*"], 1e-2)], &[])
        .err()
        .expect("fc1 is in no group")
        .to_string();
    assert!(e.contains("\"fc1.weight\" matches no group"), "{e}");
}

#[test]
fn bf16_training_keeps_f32_masters_and_follows_the_f32_run() {
    let f32_params = mlp(1);
    let bf16_params: Vec<(String, Var)> = f32_params
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().to_dtype(DType::BF16).unwrap();
            (n.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let run = |p: &[(String, Var)], dtype: DType| -> Vec<f64> {
        let mut t = trainer(p);
        (0..20)
            .map(|s| {
                let (x, y) = batch(s);
                let x = x.to_dtype(dtype).unwrap();
                t.step(&[1.0], |_| {
                    let out = forward(p, &x)?.to_dtype(DType::F32)?;
                    Ok(out.sub(&y)?.sqr()?.mean_all()?)
                })
                .unwrap()
                .loss
            })
            .collect()
    };
    let a = run(&f32_params, DType::F32);
    let b = run(&bf16_params, DType::BF16);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 5e-2 * x.abs().max(0.1),
            "step {i}: f32 loss {x} vs bf16 {y}"
        );
    }
    assert_eq!(bf16_params[0].1.as_tensor().dtype(), DType::BF16);

    // updates far below bf16's resolution are kept by the f32 master: 1000 steps of 1e-5 on a
    // weight of 1
    let w = Var::from_tensor(
        &Tensor::from_vec(vec![1f32], &[1])
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
    .unwrap();
    let opt = Optimizer::sgd(
        vec![("w".into(), w.clone())],
        vec![
            GroupSpec::new("all", &[], 1e-5)
                .betas(0.0, 0.0)
                .weight_decay(0.0),
        ],
        &[],
        false,
    )
    .unwrap();
    let mut t = Trainer::new(opt, Schedule::Constant);
    for _ in 0..1000 {
        // loss = -w: gradient -1, each step adds 1e-5
        t.step(&[1.0], |_| {
            Ok(w.as_tensor()
                .to_dtype(DType::F32)?
                .sum_all()?
                .mul_scalar(-1.0)?)
        })
        .unwrap();
    }
    // the master is 1.01; the model holds its nearest bf16, 1 + 2^-7 (updating the bf16
    // weight itself would leave it at 1: 1 + 1e-5 rounds back to 1 every step)
    let v = w.as_tensor().to_vec_f64().unwrap()[0];
    assert_eq!(v, 1.0078125, "w = {v}");
}

#[test]
fn train_only_tensors_live_beside_the_model_and_come_back_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let p = mlp(1);
    let mut t = trainer(&p);
    train(&mut t, &p, 0..2);
    let state = TrainerState {
        step: 2,
        scaler: None,
        extra: serde_json::Value::Null,
    };
    // the first parameter plays a head that the model does not keep
    let all = weights(&p);
    let (head, model) = all.split_at(1);
    let c = checkpoint::save_with_train_only(tmp.path(), model, head, &t.opt, &state).unwrap();
    let in_model = mgm_tensor::safetensors::load(c.join("model.safetensors")).unwrap();
    assert!(!in_model.contains_key(&head[0].0) && in_model.len() == model.len());
    let q = mlp(7);
    let mut t2 = trainer(&q);
    let (_, w) = checkpoint::load(&c, &mut t2.opt).expect("the head comes from train_only");
    assert_eq!(w.len(), all.len());
    for ((_, a), (_, b)) in p.iter().zip(&q) {
        assert_eq!(
            a.as_tensor().to_vec::<f32>().unwrap(),
            b.as_tensor().to_vec::<f32>().unwrap()
        );
    }
    // a name in both files is an error that names the file
    mgm_tensor::safetensors::save(
        c.join("train_only.safetensors"),
        model.iter().take(1).map(|(n, t)| (n.as_str(), t)),
    )
    .unwrap();
    let e = checkpoint::load(&c, &mut trainer(&mlp(5)).opt)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train_only.safetensors") && e.contains("too"),
        "{e}"
    );
}
