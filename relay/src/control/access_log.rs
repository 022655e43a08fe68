//! Billing records: one JSON line per closed connection, written off the data path.
//!
//! Workers collect [`Record`]s in a per-worker vector and hand the batch to the writer thread
//! over a channel once per tick (and when they stop). The writer thread owns the file: it
//! appends one line per record, flushes after each batch, rotates by size
//! (`access_log.max_size`: the file is renamed to `<path>.<unix milliseconds>` — never over
//! an older one, so a rotation cannot lose records — and a new one opened) and
//! reopens the file on SIGUSR1 (for logrotate's move-then-signal). At shutdown the workers
//! send what they hold before they exit; the writer drains the channel and flushes before
//! the process exits, so a graceful stop loses no record.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// One closed connection: what a CDN bills (bytes each way, connection time).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Record {
    /// RFC 3339, milliseconds, UTC.
    pub start: String,
    pub end: String,
    pub duration_ms: u64,
    pub client: String,
    pub host: String,
    pub path: String,
    /// Route name; empty if the request was refused before routing.
    pub route: String,
    /// `host:port` of the origin, or empty when none was connected.
    pub origin: String,
    /// 101 for an upgraded connection, relay's error status, or the origin's non-101 status.
    pub status: u16,
    pub bytes_client_to_origin: u64,
    pub bytes_origin_to_client: u64,
    /// `client_close`, `origin_close`, `client_error`, `origin_error`, `timeout`, `refused`,
    /// `drain`.
    pub cause: &'static str,
    pub worker: usize,
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub type Batch = Vec<Record>;

/// The writer thread's handle.
pub struct AccessLog {
    pub sender: crossbeam_channel::Sender<Batch>,
    pub reopen: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

struct Sink {
    path: PathBuf,
    max_size: u64,
    out: BufWriter<File>,
    written: u64,
}

fn open(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((BufWriter::with_capacity(64 * 1024, f), len))
}

impl Sink {
    fn reopen(&mut self) {
        let _ = self.out.flush();
        match open(&self.path) {
            Ok((out, len)) => {
                self.out = out;
                self.written = len;
            }
            Err(e) => tracing::error!(path = %self.path.display(), "cannot reopen access log: {e}"),
        }
    }

    fn rotate(&mut self) {
        let _ = self.out.flush();
        let mut old = self.path.clone().into_os_string();
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        old.push(format!(".{ms}"));
        // Two rotations in one millisecond: do not overwrite the first.
        while Path::new(&old).exists() {
            old.push("_");
        }
        if let Err(e) = std::fs::rename(&self.path, &old) {
            tracing::error!(path = %self.path.display(), "cannot rotate access log: {e}");
        }
        self.reopen();
    }

    fn write(&mut self, batch: &[Record]) {
        for r in batch {
            let mut line = serde_json::to_vec(r).unwrap_or_default();
            line.push(b'\n');
            if let Err(e) = self.out.write_all(&line) {
                tracing::error!(path = %self.path.display(), "access log write failed: {e}");
                return;
            }
            self.written += line.len() as u64;
            if self.max_size > 0 && self.written >= self.max_size {
                self.rotate();
            }
        }
        let _ = self.out.flush();
    }
}

impl AccessLog {
    /// Opens `path` (created if missing, appended to) and starts the writer thread.
    pub fn start(path: &Path, max_size: u64) -> std::io::Result<AccessLog> {
        let (out, written) = open(path)?;
        let mut sink = Sink {
            path: path.to_path_buf(),
            max_size,
            out,
            written,
        };
        let (sender, rx) = crossbeam_channel::unbounded::<Batch>();
        let reopen = Arc::new(AtomicBool::new(false));
        let reopen2 = reopen.clone();
        let thread = std::thread::Builder::new()
            .name("relay-accesslog".into())
            .spawn(move || loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(batch) => sink.write(&batch),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        let _ = sink.out.flush();
                        return;
                    }
                }
                if reopen2.swap(false, Ordering::AcqRel) {
                    sink.reopen();
                }
            })?;
        Ok(AccessLog {
            sender,
            reopen,
            thread,
        })
    }

    /// Waits until every sender is gone and every record is on disk.
    pub fn finish(self) {
        drop(self.sender);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> Record {
        Record {
            start: rfc3339(SystemTime::UNIX_EPOCH),
            end: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)),
            duration_ms: 1500,
            client: "127.0.0.1:1".into(),
            host: "a.example".into(),
            path: "/chat".into(),
            route: "chat".into(),
            origin: "127.0.0.1:9000".into(),
            status: 101,
            bytes_client_to_origin: i,
            bytes_origin_to_client: 2 * i,
            cause: "client_close",
            worker: 0,
        }
    }

    #[test]
    fn records_are_json_lines_and_rotate_by_size() {
        let dir = std::env::temp_dir().join(format!("relay-al-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.jsonl");
        let log = AccessLog::start(&path, 600).unwrap();
        log.sender.send((0..3).map(rec).collect()).unwrap();
        log.sender.send((3..6).map(rec).collect()).unwrap();
        log.finish();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(files.len() >= 2, "rotated: {files:?}");
        files.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
        let mut all: Vec<serde_json::Value> = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            all.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
            );
        }
        assert_eq!(all.len(), 6, "no record lost across rotations");
        let mut sent: Vec<u64> = all
            .iter()
            .map(|v| v["bytes_client_to_origin"].as_u64().unwrap())
            .collect();
        sent.sort();
        assert_eq!(sent, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(all[0]["start"], "1970-01-01T00:00:00.000Z");
        assert_eq!(all[0]["end"], "1970-01-01T00:00:01.500Z");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
