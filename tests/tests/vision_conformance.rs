//! Every CLIP / ConvNeXt fixture through `mgm::forward` (what `mgm forward` runs): f32 outputs
//! within 1e-4 max abs of transformers/timm, bf16 within 1e-2 relative.

use mgm_tests::{fixtures_dir, vision};

#[test]
fn every_vision_fixture_matches_its_reference() {
    let cases = vision::cases(&fixtures_dir());
    assert!(
        cases.len() >= 7,
        "expected the clip_* and convnext_* fixtures, found {cases:?}"
    );
    let mut failures = Vec::new();
    for dir in &cases {
        let report = vision::check(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for r in report.failures() {
            failures.push(format!(
                "{} ({:.3e} > {:.0e})",
                r.name, r.max_error, r.tolerance
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "outside tolerance:\n{}",
        failures.join("\n")
    );
}
