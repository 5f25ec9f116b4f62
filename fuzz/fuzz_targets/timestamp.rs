//! Drives discus::fuzz::timestamp (src/fuzz.rs says what it parses).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discus::fuzz::timestamp(data));
