//! `p3proxy inspect` on the real MXNet captures (`tests/captures`): the messages, keys
//! and bytes it counts per node pair are exactly those of the `.decoded.txt` files,
//! written by an independent decoder when the captures were made; iterations and keys
//! come out as the jobs ran them; bad input gets a clear error.

mod common;
use common::{capture_dir, RUNS};

use std::collections::BTreeMap;
use std::path::PathBuf;

use p3proxy::inspect::analysis::Options;
use p3proxy::inspect::{inspect_pcap, render, InspectError};

fn capture(run: &str) -> PathBuf {
    capture_dir().join(format!("{run}.pcap.gz"))
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    messages: u64,
    keys: u64,
    bytes: u64,
}

/// Per (sender, receiver) from the decoded file's message list: `#N t=.. conn=C W9 ->
/// S8 frames=4 [01:23] [01:8] ...` and the `keys [..]` line of its data frame.
fn expected(run: &str) -> BTreeMap<(String, String), Counts> {
    let path = capture_dir().join(format!("{run}.decoded.txt"));
    let text = std::fs::read_to_string(path).unwrap();
    let mut out: BTreeMap<(String, String), Counts> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let messages = &text[text.find("## Messages").unwrap()..];
    for line in messages.lines() {
        if line.starts_with('#') && line.contains(" conn=") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let arrow = words.iter().position(|w| *w == "->").unwrap();
            let pair = (words[arrow - 1].to_string(), words[arrow + 1].to_string());
            let bytes: u64 = line
                .split('[')
                .skip(1)
                .map(|f| {
                    let size: u64 = f[3..f.find(']').unwrap()].parse().unwrap();
                    size + if size > 255 { 9 } else { 2 }
                })
                .sum();
            let c = out.entry(pair.clone()).or_default();
            c.messages += 1;
            c.bytes += bytes;
            current = Some(pair);
        } else if let Some(rest) = line
            .trim_start()
            .strip_prefix("data[0] dtype=UINT64 UINT64 keys [")
        {
            let keys = rest
                .trim_end_matches(']')
                .split(", ")
                .filter(|k| !k.is_empty())
                .count();
            out.get_mut(current.as_ref().unwrap()).unwrap().keys += keys as u64;
        }
    }
    out
}

#[test]
fn counts_per_node_pair_are_exactly_the_reference_decoders() {
    for run in RUNS {
        let ins = inspect_pcap(&capture(run), Options::default(), |_| {}).unwrap();
        let got: BTreeMap<(String, String), Counts> = ins
            .report
            .pairs
            .iter()
            .map(|p| {
                assert!(!p.tunnel, "{run}: no proxy in these captures");
                (
                    (p.from.clone(), p.to.clone()),
                    Counts {
                        messages: p.messages,
                        keys: p.keys,
                        bytes: p.bytes,
                    },
                )
            })
            .collect();
        assert_eq!(got, expected(run), "{run}");
        if run == "runA_1server" {
            // The same from the connection list: 13233552 bytes from W9 to S8 less the
            // greeting (64) and READY (46).
            assert_eq!(
                got[&("W9".to_string(), "S8".to_string())],
                Counts {
                    messages: 17,
                    keys: 15,
                    bytes: 13_233_552 - 64 - 46
                }
            );
        }
        assert!(ins.connections.iter().all(|c| c.error.is_none()), "{run}");
        assert_eq!(ins.report.not_pslite_messages, 0, "{run}");
    }
}

#[test]
fn iterations_and_keys_of_the_raw_job() {
    // runA: kv_raw on one server, two workers: keys 0, 1 (4.4 MB) and 3, three rounds
    // of push + pull after the init pushes.
    let ins = inspect_pcap(&capture("runA_1server"), Options::default(), |_| {}).unwrap();
    let r = &ins.report;
    let keys: Vec<u64> = r.keys.iter().map(|k| k.key).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(
        keys.iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [0, 1, 3].into()
    );
    assert_eq!(r.iterations.len(), 3, "{:#?}", r.iterations);
    assert!(r.iterations.windows(2).all(|w| w[0].start_s < w[1].start_s));
    assert!(r.iterations[..2].iter().all(|i| i.period_s.unwrap() > 0.0));
    assert_eq!(r.unmatched_responses, 0);
    // Every request was matched with its response: one trace event each.
    let requests: u64 = r.keys.iter().map(|k| k.requests).sum();
    assert_eq!(ins.trace.len() as u64, requests);
    let table = render::table(&ins);
    assert!(table.contains("messages by node pair"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&render::json(&ins)).unwrap();
    assert_eq!(
        json["report"]["pairs"].as_array().unwrap().len(),
        r.pairs.len()
    );
    let trace: serde_json::Value = serde_json::from_str(&render::chrome_trace(&ins)).unwrap();
    assert_eq!(
        trace["traceEvents"].as_array().unwrap().len(),
        ins.trace.len()
    );
}

#[test]
fn a_priority_map_sets_the_layer_order() {
    let options = Options {
        priority: Some([(3, 1), (1, 2), (0, 3)].into()),
        ..Options::default()
    };
    let ins = inspect_pcap(&capture("runA_1server"), options, |_| {}).unwrap();
    let order: Vec<u64> = ins.report.keys.iter().map(|k| k.key).collect();
    assert_eq!(order, vec![3, 1, 0]);
    assert_eq!(ins.report.summary.layer_order, "map");
    assert_eq!(ins.report.summary.first_layer_key, Some(3));
}

#[test]
fn captures_it_cannot_read_get_clear_errors() {
    let dir = std::env::temp_dir().join(format!("p3-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.pcap");
    let err = inspect_pcap(&missing, Options::default(), |_| {}).unwrap_err();
    assert!(matches!(err, InspectError::Capture(_)));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}", missing.display())),
        "{err}"
    );
    let text = dir.join("notes.pcap");
    std::fs::write(&text, b"this is not a capture at all, just text\n").unwrap();
    let err = inspect_pcap(&text, Options::default(), |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("is not a pcap or pcapng capture"),
        "{err}"
    );
    // A capture cut short mid-packet: what was read is reported, not an error.
    let whole = std::fs::read(capture("runA_1server")).unwrap();
    let mut gz = flate2::read::MultiGzDecoder::new(&whole[..]);
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut gz, &mut raw).unwrap();
    let cut = dir.join("cut.pcap");
    std::fs::write(&cut, &raw[..raw.len() / 2 + 7]).unwrap();
    match inspect_pcap(&cut, Options::default(), |_| {}) {
        Ok(ins) => assert!(ins.capture.packets > 0),
        Err(e) => assert!(e.to_string().contains("cut.pcap"), "{e}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
