//! The encode/decode pipeline's ordering and errors (the timing test is
//! `pipeline_overlap.rs`, a binary of its own so no other test shares the cores): out-of-order
//! encoders still decode in order; a stage error stops the run without hanging the encoders;
//! bad options are errors. Plus the checkpoint policy.

use std::hint::black_box;

use mgm_umm::CheckpointPolicy;
use mgm_umm::pipeline::{self, PipelineError, PipelineOptions};

/// About `n` million multiply-adds of real work (a value the optimizer cannot skip).
fn busy(seed: u64, n: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..n * 1_000_000 {
        x = black_box(
            x.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407),
        );
    }
    x
}

#[test]
fn outputs_keep_request_order_whatever_order_encoders_finish() {
    // early requests are the slow ones, so with 3 encoders later ones finish first
    let requests: Vec<u64> = (0..12).collect();
    let out = pipeline::run(
        requests,
        PipelineOptions {
            encoders: 3,
            depth: 1,
        },
        |r: &u64| {
            busy(*r, (12 - *r) / 4);
            Ok::<u64, String>(*r * 10)
        },
        |e: u64| Ok::<u64, String>(e + 1),
    )
    .unwrap();
    assert_eq!(out, (0..12).map(|r| r * 10 + 1).collect::<Vec<_>>());
}

#[test]
fn a_stage_error_stops_the_pipeline_and_bad_options_are_errors() {
    let r = pipeline::run(
        (0..50u64).collect(),
        PipelineOptions {
            encoders: 2,
            depth: 1,
        },
        |r: &u64| {
            if *r == 7 {
                Err(format!("request {r} is unreadable"))
            } else {
                Ok(*r)
            }
        },
        |e: u64| Ok::<u64, String>(e),
    );
    match r {
        Err(PipelineError::Stage(e)) => assert_eq!(e, "request 7 is unreadable"),
        other => panic!("expected the encode error, got {other:?}"),
    }
    let r = pipeline::run(
        (0..50u64).collect(),
        PipelineOptions::default(),
        |r: &u64| Ok::<u64, String>(*r),
        |e: u64| {
            if e == 3 {
                Err("decode failed".to_string())
            } else {
                Ok(e)
            }
        },
    );
    assert!(matches!(r, Err(PipelineError::Stage(ref e)) if e == "decode failed"));
    let r = pipeline::run(
        vec![1u64],
        PipelineOptions {
            encoders: 0,
            depth: 1,
        },
        |r: &u64| Ok::<u64, String>(*r),
        |e: u64| Ok::<u64, String>(e),
    );
    let e = r.unwrap_err().to_string();
    assert!(e.contains("0 encoders"), "{e}");
}

#[test]
fn checkpoint_policy_keeps_every_kth_layer() {
    let p = CheckpointPolicy::seed();
    let kept: Vec<usize> = (0..10).filter(|&l| p.keeps(l)).collect();
    assert_eq!(kept, vec![0, 4, 8]);
    assert_eq!(p.kept(24), 6); // the seed's 1/4
    assert_eq!(CheckpointPolicy::every(1).unwrap().kept(7), 7);
    assert!(CheckpointPolicy::every(0).is_err());
}
