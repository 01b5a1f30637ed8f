#![no_main]
//! `p3proxy_parsers::invariants::frames` on arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| p3proxy_parsers::invariants::frames(data));
