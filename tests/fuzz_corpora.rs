//! The fuzzers' corpora, replayed on every CI run: every input the coverage-guided fuzzers in
//! `fuzz/` kept (they keep those that reach new code), and every crash they once found, goes
//! through its parser again — so a parser that panics on one of them fails here, without a fuzzer.
//! docs/reliability.md says how to run the fuzzers themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

#[test]
fn every_corpus_input_goes_through_its_parser_without_a_panic() {
    let mut replayed = 0;
    for (name, parse) in discus::fuzz::TARGETS {
        let corpus = support::repo().join("fuzz/corpus").join(name);
        let inputs = support::files_in(&format!("fuzz/corpus/{name}"));
        assert!(!inputs.is_empty(), "{}: an empty corpus", corpus.display());
        for input in inputs {
            let data = std::fs::read(&input).expect("corpus input");
            let outcome = std::panic::catch_unwind(|| parse(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", input.display());
            replayed += 1;
        }
    }
    println!("replayed {replayed} inputs");
}

#[test]
fn every_fuzz_target_has_a_corpus_and_a_fuzzer() {
    for (name, _) in discus::fuzz::TARGETS {
        let target = support::repo().join(format!("fuzz/fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&target)
            .unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        assert!(
            text.contains(&format!("discus::fuzz::{name}(")),
            "{} must drive discus::fuzz::{name}",
            target.display()
        );
    }
}
