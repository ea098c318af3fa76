//! mgm-tensor against PyTorch on a composite expression (conv2d, interpolate, layer_norm, matmul,
//! gelu, softmax, rms_norm, cross entropy): forward values and all gradients.

#[test]
fn tensor_composite_matches_pytorch_forward_and_gradients() {
    let dir = mgm_tests::fixtures_dir().join("tensor_composite");
    let report = mgm_tests::tensor_composite::check(&dir).expect("fixture loads and evaluates");
    assert_eq!(report.rows.len(), 2 * (3 + 9), "every quantity is compared");
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "mismatches against PyTorch:\n{}",
        report.table()
    );
}
