//! The README's main command: `mgm generate` with no --model runs the embedded default (the
//! MGM that `cargo xtask train-demo` trains on procedural shapes) and answers the question
//! about the committed example image correctly; the answer is the scene's ground truth, read
//! off the generator (mgm::shapes), not a recorded model output.

mod common;

use std::path::PathBuf;

use common::mgm;
use mgm::shapes::{COLOURS, SHAPES, example};

#[test]
fn the_default_model_answers_the_readme_question() {
    let (_, s) = example(64, None).unwrap();
    let png = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shapes/shapes.png");
    let committed = mgm_vision::preprocess::load_image(&png, Default::default()).unwrap();
    assert_eq!(
        committed.as_bytes(),
        s.image.as_bytes(),
        "examples/shapes/shapes.png is the example split's scene"
    );
    let square = s
        .objects
        .iter()
        .find(|o| SHAPES[o.shape] == "square")
        .unwrap();
    let out = mgm(&[
        "generate",
        "--image",
        png.to_str().unwrap(),
        "--prompt",
        "What colour is the square?",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        COLOURS[square.colour].0
    );
}
