//! mgm-train against PyTorch (tests/reference/gen_train.py): two AdamW steps of a tiny LLaMA
//! with two parameter groups and gradient clipping (loss, gradients, norms, updated weights),
//! the warmup-cosine schedule, SGD with Nesterov momentum, and gradient accumulation against
//! the big batch.

use std::collections::HashMap;

use mgm_llm::{CausalLm, DecoderConfig};
use mgm_tensor::nn::VarStore;
use mgm_tensor::{DType, Tensor, Var};
use mgm_tests::{Comparison, Report};
use mgm_train::{Grads, GroupSpec, Optimizer, Schedule, Trainer, loss::causal_lm_loss};

const TOL: f64 = 1e-5;

fn fixture() -> std::path::PathBuf {
    mgm_tests::fixtures_dir().join("train_llama_step")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    mgm_tensor::safetensors::load(fixture().join(name)).expect("fixture file")
}

fn llm(e: mgm_llm::Error) -> mgm_train::Error {
    mgm_train::Error::Input(e.to_string())
}

#[test]
fn two_adamw_steps_of_a_tiny_llama_match_pytorch() {
    let dir = fixture();
    let cfg = DecoderConfig::from_file(dir.join("config.json")).expect("config");
    let vs = VarStore::from_safetensors(&[dir.join("model.safetensors")])
        .expect("weights")
        .with_dtype(DType::F32)
        .trainable(0);
    let model = CausalLm::load(&vs, &cfg).expect("trainable model");
    let batch = load("batch.safetensors");
    let want = load("expected.safetensors");
    let (ids, labels) = (&batch["input_ids"], &batch["labels"]);
    let vars = vs.all_vars();
    assert_eq!(vars.len(), 21, "every weight of the 2-layer model is a Var");
    let opt = Optimizer::adamw(
        vars,
        vec![
            GroupSpec::new("embed", &["model.embed_tokens.weight"], 1e-3)
                .weight_decay(0.0)
                .betas(0.9, 0.999)
                .eps(1e-8),
            GroupSpec::new("rest", &[], 3e-3)
                .weight_decay(0.1)
                .betas(0.9, 0.98)
                .eps(1e-6),
        ],
        &[],
    )
    .expect("optimizer");
    let loss_fn = || -> mgm_train::Result<Tensor> {
        let logits = model.forward(ids, None).map_err(llm)?;
        causal_lm_loss(&logits, labels, 0.1)
    };
    let mut report = Report::default();
    // the unclipped gradients of the first step
    loss_fn().unwrap().backward().unwrap();
    let grads = Grads::collect(&opt).unwrap();
    for ((name, _), g) in opt.vars().iter().zip(grads.values()) {
        let want_g = want[&format!("grad.{name}")].to_vec_f64().unwrap();
        let got: Vec<f64> = g
            .as_ref()
            .map(|g| g.iter().map(|&x| f64::from(x)).collect())
            .unwrap_or_else(|| vec![f64::NAN; want_g.len()]);
        report
            .rows
            .push(Comparison::new(format!("grad.{name}"), &got, &want_g, TOL));
    }
    opt.zero_grad();
    let mut trainer = Trainer::new(opt, Schedule::Constant);
    trainer.clip = Some(0.5);
    for step in 0..2 {
        let r = trainer.step(&[1.0], |_| loss_fn()).expect("step");
        for (what, got) in [("loss", r.loss), ("grad_norm", r.grad_norm)] {
            let key = format!("{what}.{step}");
            report.rows.push(Comparison::new(
                key.clone(),
                &[got],
                &want[&key].to_vec_f64().unwrap(),
                TOL,
            ));
        }
        for (name, var) in trainer.opt.vars() {
            let key = format!("step{}.{name}", step + 1);
            report.rows.push(Comparison::new(
                key.clone(),
                &var.as_tensor().to_vec_f64().unwrap(),
                &want[&key].to_vec_f64().unwrap(),
                TOL,
            ));
        }
    }
    assert_eq!(report.rows.len(), 21 + 2 * (2 + 21));
    assert!(
        report.failures().is_empty(),
        "mismatches against PyTorch:\n{}",
        report.table()
    );
}

#[test]
fn warmup_cosine_matches_transformers() {
    let want = load("schedule.safetensors")["cosine"].to_vec_f64().unwrap();
    let s = Schedule::WarmupCosine {
        warmup: 5,
        total: 30,
        min_ratio: 0.0,
    };
    // up to the last step; past it transformers' cosine rises again (progress above 1), where
    // ours stays at the floor
    let got: Vec<f64> = (0..=30).map(|i| s.factor(i)).collect();
    let c = Comparison::max_abs("cosine factors", &got, &want[..=30], 1e-12);
    assert!(c.passed(), "{c:?}");
    assert!(want[35] > 0.0 && (31..40).all(|i| s.factor(i) == 0.0));
}

/// y = x w^T, mean squared error over all outputs.
fn mse(w: &Var, x: &Tensor, y: &Tensor) -> mgm_train::Result<Tensor> {
    Ok(x.matmul(&w.as_tensor().t()?)?.sub(y)?.sqr()?.mean_all()?)
}

#[test]
fn sgd_nesterov_and_accumulated_adamw_match_pytorch() {
    let f = load("schedule.safetensors");
    let (x, y) = (&f["acc.x"], &f["acc.y"]);
    // SGD, two steps on the whole batch
    let w = Var::from_tensor(&f["acc.w"]).unwrap();
    let opt = Optimizer::sgd(
        vec![("w".into(), w.clone())],
        vec![
            GroupSpec::new("all", &[], 0.05)
                .betas(0.9, 0.0)
                .weight_decay(0.01),
        ],
        &[],
        true,
    )
    .unwrap();
    let mut t = Trainer::new(opt, Schedule::Constant);
    for _ in 0..2 {
        t.step(&[1.0], |_| mse(&w, x, y)).unwrap();
    }
    let c = Comparison::new(
        "sgd nesterov",
        &w.as_tensor().to_vec_f64().unwrap(),
        &f["sgd.w_after2"].to_vec_f64().unwrap(),
        TOL,
    );
    assert!(c.passed(), "{c:?}");

    // AdamW: the big batch of 8 against four micro-batches of 2, each against PyTorch
    let adamw = |w: &Var| {
        Optimizer::adamw(
            vec![("w".into(), w.clone())],
            vec![
                GroupSpec::new("all", &[], 1e-2)
                    .betas(0.9, 0.98)
                    .weight_decay(0.01),
            ],
            &[],
        )
        .unwrap()
    };
    let big = Var::from_tensor(&f["acc.w"]).unwrap();
    Trainer::new(adamw(&big), Schedule::Constant)
        .step(&[1.0], |_| mse(&big, x, y))
        .unwrap();
    let acc = Var::from_tensor(&f["acc.w"]).unwrap();
    Trainer::new(adamw(&acc), Schedule::Constant)
        .step(&[2.0; 4], |i| {
            mse(&acc, &x.narrow(0, 2 * i, 2)?, &y.narrow(0, 2 * i, 2)?)
        })
        .unwrap();
    let want = f["acc.w_after"].to_vec_f64().unwrap();
    let (b, a) = (
        big.as_tensor().to_vec_f64().unwrap(),
        acc.as_tensor().to_vec_f64().unwrap(),
    );
    for c in [
        Comparison::new("adamw big batch", &b, &want, TOL),
        Comparison::new("adamw 4 micro-batches", &a, &want, TOL),
        Comparison::max_abs("micro-batches vs big batch", &a, &b, 1e-6),
    ] {
        assert!(c.passed(), "{c:?}");
    }
}
