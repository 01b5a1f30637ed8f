//! What the capture tests share.

use std::path::PathBuf;

/// The real MXNet 1.9.1 captures in `tests/captures` (copied from
/// `../shared/wire/captures`), each with its `.decoded.txt` from the reference decoder.
pub const RUNS: [&str; 5] = [
    "runA_1server",
    "runB_2servers",
    "runC_ext_2servers",
    "runD_gc_2servers",
    "runE_resend_1server",
];

/// Where they are.
pub fn capture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/captures")
}
