//! LLaVA against transformers: every llava_* fixture (feature layer -2 / -1 / a list, 'default'
//! and 'full' selection), one and two images per prompt.

#[test]
fn llava_logits_match_transformers_with_one_and_two_images() {
    let dirs = mgm_tests::model_dirs(&mgm_tests::fixtures_dir(), &["llava_"]);
    assert_eq!(dirs.len(), 3, "the three llava fixtures: {dirs:?}");
    for dir in dirs {
        let report = mgm_tests::llava::check(&dir).expect("fixture loads and runs");
        assert_eq!(report.rows.len(), 4);
        assert!(
            report.failures().is_empty(),
            "mismatches against transformers:\n{}",
            report.table()
        );
    }
}

#[test]
fn llava_image_token_count_must_match_the_images() {
    let dir = mgm_tests::fixtures_dir().join("llava_default");
    let llava = mgm::llava::Llava::from_dir(&dir, None).expect("loads");
    let inputs = mgm_tensor::safetensors::load(dir.join("inputs_2.safetensors")).expect("inputs");
    let one = inputs["pixel_values"].narrow(0, 0, 1).expect("first image");
    let e = llava
        .forward(&inputs["input_ids"], Some(&one), None)
        .expect_err("8 image tokens for 1 image is an error")
        .to_string();
    assert!(
        e.contains("8 image tokens") && e.contains("4 image features"),
        "{e}"
    );
}
