//! Writes the fuzz targets' seed corpora (`parsers/fuzz/corpus/<target>/`) from the real
//! captures and the optimizer fixtures. Not a test: run it when the captures change,
//! `cargo test --test fuzz_seeds -- --ignored`, and commit what it writes.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use bytes::Bytes;
use common::{capture_dir, RUNS};
use p3proxy::capture::{collect_connections, read_packets};
use p3proxy::parsers::zmtp::{parse_unit, Limits, Unit};

/// Largest seed kept (the fuzzer grows inputs from small ones).
const MAX_SEED: usize = 4096;

fn corpus(target: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("parsers/fuzz/corpus/{target}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, seeds: &BTreeSet<Vec<u8>>) {
    let dir = corpus(target);
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:04}")), s).unwrap();
    }
    println!("{target}: {} seeds", seeds.len());
}

#[test]
#[ignore = "writes the fuzz seed corpora"]
fn write_seed_corpora() {
    let mut greetings = BTreeSet::new();
    let mut commands = BTreeSet::new();
    let mut frames = BTreeSet::new();
    let mut streams = BTreeSet::new();
    let mut metas = BTreeSet::new();
    let mut messages = BTreeSet::new();
    for run in RUNS {
        let packets = read_packets(&capture_dir().join(format!("{run}.pcap.gz"))).unwrap();
        for conn in collect_connections(&packets) {
            for dir in [&conn.to_server, &conn.to_client] {
                if dir.len() < 64 {
                    continue;
                }
                greetings.insert(dir[..64].to_vec());
                // A stream seed: a chunk size byte, then the stream's head.
                let mut s = vec![7u8];
                s.extend_from_slice(&dir[..dir.len().min(MAX_SEED)]);
                streams.insert(s);
                let mut buf = Bytes::copy_from_slice(&dir[64..]);
                while let Ok(Some((unit, used))) = parse_unit(&buf, &Limits::default()) {
                    if used <= MAX_SEED {
                        frames.insert(buf[..used].to_vec());
                    }
                    match unit {
                        Unit::Command(c) => {
                            commands.insert(c.encode_body());
                        }
                        Unit::Message(m) => {
                            if let Some(f) = m.frames.first() {
                                metas.insert(f.body.to_vec());
                            }
                            // A message seed in the target's layout: frame count, then
                            // each frame's length byte and bytes.
                            let bodies: Vec<&[u8]> = m.frames.iter().map(|f| &f.body[..]).collect();
                            if bodies.iter().all(|b| b.len() < 256) && bodies.len() <= 6 {
                                let mut seed = vec![(bodies.len() - 1) as u8];
                                for b in &bodies[..bodies.len() - 1] {
                                    seed.push(b.len() as u8);
                                    seed.extend_from_slice(b);
                                }
                                seed.extend_from_slice(bodies[bodies.len() - 1]);
                                messages.insert(seed);
                            }
                        }
                    }
                    buf = buf.slice(used..);
                }
            }
        }
    }
    write("greeting", &greetings);
    write("command", &commands);
    write("frames", &frames);
    write("stream", &streams);
    write("meta", &metas);
    write("message", &messages);
    let mut pickles = BTreeSet::new();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("parsers/tests/optimizers");
    for entry in std::fs::read_dir(fixtures).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pickle") {
            pickles.insert(std::fs::read(path).unwrap());
        }
    }
    write("pickle", &pickles);
}
