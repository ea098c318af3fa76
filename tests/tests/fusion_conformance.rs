//! mgm-fusion against PyTorch: MGM's patch-info mining and its projector, forward values and
//! the gradients of inputs and all parameters.

#[test]
fn mining_matches_pytorch_forward_and_gradients() {
    let dir = mgm_tests::fixtures_dir().join("fusion_mining");
    let report = mgm_tests::fusion::check(&dir).expect("fixture loads and evaluates");
    // mined, tokens, 2 input grads, 16 parameter grads; in f32 and f64
    assert_eq!(report.rows.len(), 2 * (2 + 2 + 16), "{}", report.table());
    assert!(
        report.failures().is_empty(),
        "mismatches against PyTorch:\n{}",
        report.table()
    );
}
