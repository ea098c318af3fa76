//! `on_pool` carries the caller's recording state onto the worker that runs the job, whatever
//! state that worker is in. Its own test binary: it leaves the global pool's workers with
//! recording off, as a worker waiting inside another computation's `no_grad` scope would be.

use mgm_tensor::{NoGradGuard, Tensor, Var, is_grad_enabled, no_grad, on_pool};

#[test]
fn on_pool_runs_with_the_callers_recording_state() {
    // every worker of the global pool now has recording off (the guards are never dropped)
    let off = rayon::broadcast(|_| {
        std::mem::forget(NoGradGuard::new());
        is_grad_enabled()
    });
    assert!(off.iter().all(|on| !on));

    let w = Var::from_tensor(&Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap()).unwrap();
    let y = on_pool(|| {
        assert!(rayon::current_thread_index().is_some(), "ran off the pool");
        w.as_tensor().exp().unwrap().sum_all().unwrap()
    });
    assert!(is_grad_enabled());
    let g = y.backward().expect("the loss built on the pool is tracked");
    let dw = g.get_var(&w).unwrap().to_vec_f64().unwrap();
    let want: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
    for (a, b) in dw.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-6 * b,
            "d/dw sum(exp(w)) = {dw:?}, want {want:?}"
        );
    }

    let y = no_grad(|| on_pool(|| w.as_tensor().exp().unwrap()));
    assert!(!y.is_tracked(), "no_grad around on_pool recorded a graph");

    // the workers are back in the state they were in
    assert!(rayon::broadcast(|_| is_grad_enabled()).iter().all(|on| !on));
}
