//! Replays the fuzz corpora (`parsers/fuzz/corpus/<target>/`: seeds from the real
//! captures plus what the fuzzer kept) and any crash inputs once found and fixed
//! (`parsers/fuzz/regressions/<target>/`) through the same invariants the fuzz targets
//! assert, so the normal test suite keeps every one of them.

use std::path::PathBuf;

use p3proxy_parsers::invariants;

/// An invariant check: panics when the input breaks it.
type Check = fn(&[u8]);

fn replay(target: &str, check: Check) -> usize {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(base.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(
                result.is_ok(),
                "{target}: {} breaks an invariant",
                path.display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn every_corpus_input_keeps_the_invariants() {
    let targets: [(&str, Check); 7] = [
        ("greeting", invariants::greeting),
        ("command", invariants::command),
        ("frames", invariants::frames),
        ("stream", invariants::stream),
        ("meta", invariants::meta),
        ("message", invariants::message),
        ("pickle", invariants::pickle),
    ];
    for (target, check) in targets {
        let n = replay(target, check);
        assert!(n > 0, "{target}: no corpus");
    }
}
