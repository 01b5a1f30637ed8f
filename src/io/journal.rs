//! The journal file (DESIGN.md §7): read back at start, appended as the job teaches;
//! a layout is synced to disk before its first slice request goes out.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::core::journal::{parse_journal, JournalError, Record};

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalFileError {
    /// Reading, creating or opening it failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line cannot be read: the proxy will not guess what it split.
    #[error("journal {path}: {source}; if no job is running, move the file away to start afresh")]
    Damaged {
        /// The file.
        path: String,
        /// The damaged line.
        source: JournalError,
    },
}

/// An open journal.
#[derive(Debug)]
pub(crate) struct JournalFile {
    path: PathBuf,
    file: File,
}

impl JournalFile {
    /// Opens (creating it and its directory if needed) and reads `path`.
    pub(crate) fn open(path: &Path) -> Result<(JournalFile, Vec<Record>), JournalFileError> {
        let io = |source| JournalFileError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let (records, torn) = parse_journal(&text).map_err(|source| JournalFileError::Damaged {
            path: path.display().to_string(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if torn {
            // A record whose write never finished: nothing went out on its account.
            tracing::warn!(path = %path.display(), "journal ends in an unfinished record: dropped");
            file.write_all(b"\n").map_err(io)?;
        }
        Ok((
            JournalFile {
                path: path.to_path_buf(),
                file,
            },
            records,
        ))
    }

    /// Appends a record; `sync`: on disk before returning.
    pub(crate) fn append(&mut self, record: &Record, sync: bool) -> std::io::Result<()> {
        self.file.write_all(record.encode().as_bytes())?;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Where it is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
