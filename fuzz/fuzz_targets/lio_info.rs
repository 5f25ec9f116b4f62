//! Drives discus::fuzz::lio_info (src/fuzz.rs says what it parses).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discus::fuzz::lio_info(data));
