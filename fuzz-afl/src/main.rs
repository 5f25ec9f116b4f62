//! One AFL++ harness for every parser of untrusted input: the first argument names the target
//! (as `fuzz/fuzz_targets/` and `fuzz/corpus/` do), AFL++ feeds the input.

/// The targets, by name: each an entry point of `discus::fuzz`.
const TARGETS: [(&str, fn(&[u8])); 7] = [
    ("manifests", discus::fuzz::manifests),
    ("tgt_show", discus::fuzz::tgt_show),
    ("lio_info", discus::fuzz::lio_info),
    ("image_header", discus::fuzz::image_header),
    ("content_range", discus::fuzz::content_range),
    ("quantity", discus::fuzz::quantity),
    ("timestamp", discus::fuzz::timestamp),
];

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some((_, target)) = TARGETS.iter().find(|(known, _)| *known == name) else {
        let known: Vec<&str> = TARGETS.iter().map(|(known, _)| *known).collect();
        eprintln!("usage: discus-afl TARGET, one of: {}", known.join(", "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
