//! Journal records (DESIGN.md §7): what a restarted proxy must know to continue a job
//! whose keys it split — the local nodes' registrations (learned ports), the node
//! table, the scheduler's port, and every split layout. One JSON object per line,
//! appended; a layout is written (and synced) before its first slice request goes out.
//!
//! Replaying the records in order rebuilds the state: a new registration of a server
//! address starts that server afresh (a new job), an exit forgets it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::split::Layout;

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// A local node registered with the scheduler through this proxy.
    Registered {
        /// Its ROUTER address.
        addr: SocketAddr,
        /// It is a server.
        server: bool,
    },
    /// A local node exited.
    Exited {
        /// Its ROUTER address.
        addr: SocketAddr,
    },
    /// The scheduler's node table.
    Nodes {
        /// (id, role, address) of every node.
        nodes: Vec<(i32, i32, Option<SocketAddr>)>,
    },
    /// The scheduler's port.
    SchedulerPort {
        /// The port.
        port: u16,
    },
    /// A key split in front of local server `server`.
    Layout {
        /// The server's address.
        server: SocketAddr,
        /// How the key is stored.
        layout: Layout,
        /// Slice keys the server had handed out after this one.
        next_slice: u64,
    },
}

impl Record {
    /// The line written for this record (with its newline).
    pub fn encode(&self) -> String {
        let mut line = serde_json::to_string(self).expect("records serialize");
        line.push('\n');
        line
    }
}

/// A journal that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal line {line}: {reason}")]
pub struct JournalError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads a journal. A last line without its newline is a write that never finished
/// (nothing was sent on its account): it is dropped and reported as `torn`.
pub fn parse_journal(text: &str) -> Result<(Vec<Record>, bool), JournalError> {
    let (complete, torn) = match text.rfind('\n') {
        Some(i) => (&text[..=i], !text[i + 1..].is_empty()),
        None => ("", !text.is_empty()),
    };
    let mut records = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| JournalError {
            line: i + 1,
            reason: e.to_string(),
        })?;
        records.push(record);
    }
    Ok((records, torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_last_line_is_dropped() {
        let server: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let layout = Layout {
            key: 7,
            head: 0,
            total: 4004,
            slice: 400,
            first: 1 << 31,
            count: 11,
        };
        let records = vec![
            Record::Registered {
                addr: server,
                server: true,
            },
            Record::SchedulerPort { port: 9091 },
            Record::Nodes {
                nodes: vec![(8, 0, Some(server)), (9, 1, None)],
            },
            Record::Layout {
                server,
                layout,
                next_slice: 11,
            },
            Record::Exited { addr: server },
        ];
        let text: String = records.iter().map(Record::encode).collect();
        assert_eq!(parse_journal(&text), Ok((records.clone(), false)));
        let torn = format!("{text}{}", &records[3].encode()[..20]);
        assert_eq!(parse_journal(&torn), Ok((records, true)));
        assert_eq!(parse_journal(""), Ok((vec![], false)));
    }

    #[test]
    fn a_damaged_line_is_an_error_naming_it() {
        let text = "{\"record\":\"scheduler_port\",\"port\":9091}\n{\"record\":\"layout\"}\n";
        let err = parse_journal(text).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(
            err.to_string().starts_with("journal line 2: missing field"),
            "{err}"
        );
        let unknown = "{\"record\":\"scheduler_port\",\"port\":9091,\"x\":1}\n";
        assert_eq!(parse_journal(unknown).unwrap_err().line, 1);
    }
}
