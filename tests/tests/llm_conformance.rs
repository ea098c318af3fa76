//! Every causal-LM fixture (`llm_*`): logits within 1e-4 max abs of transformers for the full
//! forward, prefill + KV-cached decode and a left-padded batch; greedy generation (single and
//! batched) token-identical to `generate(do_sample=False)`.

use mgm_tests::{fixtures_dir, llm};

#[test]
fn every_llm_fixture_matches_transformers() {
    let cases = llm::cases(&fixtures_dir());
    assert!(
        cases.len() >= 7,
        "expected the llm_* fixtures (llama, llama_v4config, llama_dynamic, gemma, mixtral, \
         mistral, llama_trained), found {cases:?}"
    );
    let mut failures = Vec::new();
    let mut table = String::new();
    for dir in &cases {
        let report = llm::check(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        table.push_str(&report.table());
        for r in report.failures() {
            failures.push(format!(
                "{} ({:.3e} > {:.0e})",
                r.name, r.max_error, r.tolerance
            ));
        }
    }
    eprintln!("{table}");
    assert!(
        failures.is_empty(),
        "outside tolerance:\n{}\n{table}",
        failures.join("\n")
    );
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let report = llm::check_tokenizer(&fixtures_dir().join("tokenizer_bpe"))
        .unwrap_or_else(|e| panic!("tokenizer_bpe: {e}"));
    let failures: Vec<String> = report.failures().iter().map(|r| r.name.clone()).collect();
    assert!(report.rows.len() >= 40, "{}", report.table());
    assert!(
        failures.is_empty(),
        "mismatches: {failures:?}\n{}",
        report.table()
    );
}
