#![no_main]
//! `p3proxy_parsers::invariants::greeting` on arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| p3proxy_parsers::invariants::greeting(data));
