//! Mini-Gemini against its independent PyTorch implementation: LLaMA, Gemma, Mixtral and Mistral backbones, the
//! normal and the HD variant, one and two images, the low-res input given or derived, image tokens and mining gradients;
//! and a checkpoint that holds its towers itself (mgm_embedded).

#[test]
fn mgm_logits_and_mining_gradients_match_the_pytorch_reference() {
    let dirs = mgm_tests::model_dirs(&mgm_tests::fixtures_dir(), &["mgm_"]);
    assert_eq!(
        dirs.len(),
        6,
        "mgm_embedded, mgm_gemma, mgm_hd, mgm_llama, mgm_mistral and mgm_mixtral: {dirs:?}"
    );
    for dir in dirs {
        let report = mgm_tests::mgm::check(&dir).expect("fixture loads and runs");
        // 2 prompts x (2 logits + tokens), then 12 mining parameters
        assert_eq!(report.rows.len(), 2 * 3 + 12, "{}", report.table());
        assert!(
            report.failures().is_empty(),
            "mismatches against the reference:\n{}",
            report.table()
        );
    }
}

#[test]
fn mgm_placeholder_count_must_match_the_images() {
    let dir = mgm_tests::fixtures_dir().join("mgm_llama");
    let m = mgm::minigemini::Mgm::from_dir(&dir, &Default::default(), None).expect("loads");
    let inputs = mgm_tensor::safetensors::load(dir.join("inputs_2.safetensors")).expect("inputs");
    let one = inputs["pixel_values_aux"]
        .narrow(0, 0, 1)
        .expect("first image");
    let e = m
        .forward(&inputs["input_ids"], Some(&one), None)
        .expect_err("2 placeholders for 1 image")
        .to_string();
    assert!(
        e.contains("2 image placeholder(s) (-200) for 1 image(s)"),
        "{e}"
    );
}

#[test]
fn mgm_towers_in_the_checkpoint_still_need_the_clip_config() {
    let dir = mgm_tests::fixtures_dir().join("mgm_embedded");
    let towers = mgm::minigemini::TowerDirs {
        vision_tower: Some(dir.join("no-such-clip")),
        vision_tower_aux: None,
    };
    let e = mgm::minigemini::Mgm::from_dir(&dir, &towers, None)
        .err()
        .expect("no CLIP config")
        .to_string();
    assert!(
        e.contains("mm_vision_tower") && e.contains("holds the CLIP weights but not its config"),
        "{e}"
    );
}
