//! File sources: JSON Lines event logs and catalogs, read whole (replay) or followed like
//! `tail -f` (run).
//!
//! Every worker opens the file itself and takes every `peers`-th line (line `n` belongs to
//! worker `(n - 1) % peers`), so parsing runs on all workers and each line has exactly one
//! owner, which knows its line number for dead letters. Lines are capped: a line longer than
//! the event limit is not buffered past it (only its prefix is kept for the dead letter).

use crate::parse::MAX_EVENT_BYTES;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What the next call found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A line of this worker's share: its 1-based number and whether it was over the cap.
    Line { number: u64, oversize: bool },
    /// Following and nothing new yet.
    Wait,
    /// Not following and the file is done.
    End,
}

pub struct LineSource {
    path: PathBuf,
    reader: BufReader<Box<dyn Read + Send>>,
    gz: bool,
    follow: bool,
    index: u64,
    peers: u64,
    /// Lines completed so far (all workers' shares).
    lines: u64,
    /// Bytes consumed from the file (uncompressed stream for `.gz`).
    offset: u64,
    /// Of those, the bytes of a line not complete yet.
    partial: u64,
    /// The line being assembled, capped at `cap + 1` bytes.
    buf: Vec<u8>,
    oversize: bool,
    /// The longest line kept whole.
    cap: usize,
}

fn open(path: &Path) -> Result<(Box<dyn Read + Send>, bool)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let reader: Box<dyn Read + Send> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok((reader, gz))
}

impl LineSource {
    pub fn open(path: &Path, follow: bool, index: usize, peers: usize) -> Result<Self> {
        let (reader, gz) = open(path)?;
        if gz && follow {
            bail!(
                "{}: a .gz file cannot be followed; set source.follow = false or use a plain file",
                path.display()
            );
        }
        Ok(LineSource {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, reader),
            gz,
            follow,
            index: index as u64,
            peers: peers.max(1) as u64,
            lines: 0,
            offset: 0,
            partial: 0,
            buf: Vec::with_capacity(1024),
            oversize: false,
            cap: MAX_EVENT_BYTES,
        })
    }

    /// Keeps lines of up to `cap` bytes whole, instead of the event limit.
    pub fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap;
        self
    }

    /// Bytes of the complete lines read so far.
    pub fn offset(&self) -> u64 {
        self.offset - self.partial
    }

    /// Lines seen so far, of all shares.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Current size of the file on disk (for lag), if known.
    pub fn file_len(&self) -> Option<u64> {
        if self.gz {
            return None;
        }
        std::fs::metadata(&self.path).ok().map(|m| m.len())
    }

    /// The current line's bytes, valid after [`Next::Line`].
    pub fn line(&self) -> &[u8] {
        &self.buf
    }

    /// Advances to the next line of this worker's share.
    pub fn next_line(&mut self) -> Result<Next> {
        loop {
            let mine = self.lines % self.peers == self.index;
            let chunk = match self.reader.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", self.path.display()))
                }
            };
            if chunk.is_empty() {
                if self.follow {
                    self.check_truncation()?;
                    return Ok(Next::Wait);
                }
                if self.buf.is_empty() && !self.oversize {
                    return Ok(Next::End);
                }
                // A last line without a newline is still a line.
                return Ok(self.finish_line(mine));
            }
            let (take, complete) = match memchr(chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if mine && !self.oversize {
                let body = if complete {
                    &chunk[..take - 1]
                } else {
                    &chunk[..take]
                };
                let room = (self.cap + 1).saturating_sub(self.buf.len());
                if body.len() > room {
                    self.buf.extend_from_slice(&body[..room]);
                    self.oversize = true;
                } else {
                    self.buf.extend_from_slice(body);
                }
            }
            self.reader.consume(take);
            self.offset += take as u64;
            self.partial = if complete {
                0
            } else {
                self.partial + take as u64
            };
            if complete {
                if let Some(next) = Some(self.finish_line(mine)).filter(|n| *n != Next::Wait) {
                    return Ok(next);
                }
            }
        }
    }

    /// Ends the current line; `Wait` here means "not ours, keep going".
    fn finish_line(&mut self, mine: bool) -> Next {
        self.lines += 1;
        self.partial = 0;
        if !mine {
            return Next::Wait;
        }
        let oversize = self.oversize || self.buf.len() > self.cap;
        self.oversize = false;
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        Next::Line {
            number: self.lines,
            oversize,
        }
    }

    /// Call after a line has been handled, before the next `next()`.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// A followed file that shrank was truncated or replaced: start again from its beginning.
    fn check_truncation(&mut self) -> Result<()> {
        let Some(len) = self.file_len() else {
            return Ok(());
        };
        if len < self.offset {
            tracing::warn!(path = %self.path.display(), "followed file shrank from {} to {len} bytes; reading it again from the start", self.offset);
            let mut file = File::open(&self.path)
                .with_context(|| format!("cannot reopen {}", self.path.display()))?;
            file.seek(SeekFrom::Start(0))?;
            self.reader = BufReader::with_capacity(1 << 16, Box::new(file));
            self.offset = 0;
            self.partial = 0;
            self.lines = 0;
            self.buf.clear();
            self.oversize = false;
        }
        Ok(())
    }
}

/// Every worker scans the whole log for line ends (it takes every N-th line), so this search
/// runs over N times the log's bytes: a vectorised one.
fn memchr(haystack: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', haystack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn collect(path: &Path, index: usize, peers: usize) -> Vec<(u64, String, bool)> {
        let mut src = LineSource::open(path, false, index, peers).unwrap();
        let mut out = Vec::new();
        loop {
            match src.next_line().unwrap() {
                Next::Line { number, oversize } => {
                    out.push((
                        number,
                        String::from_utf8_lossy(src.line()).to_string(),
                        oversize,
                    ));
                    src.clear();
                }
                Next::Wait => unreachable!(),
                Next::End => return out,
            }
        }
    }

    #[test]
    fn shares_partition_the_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "a\nb\r\n\nd\ne").unwrap();
        let all = collect(&path, 0, 1);
        assert_eq!(
            all.iter().map(|l| l.1.as_str()).collect::<Vec<_>>(),
            ["a", "b", "", "d", "e"]
        );
        let mut merged: Vec<_> = (0..3).flat_map(|i| collect(&path, i, 3)).collect();
        merged.sort();
        assert_eq!(merged, all);
    }

    #[test]
    fn long_lines_are_capped_and_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let long = "x".repeat(MAX_EVENT_BYTES * 3);
        std::fs::write(&path, format!("ok\n{long}\nafter\n")).unwrap();
        let all = collect(&path, 0, 1);
        assert_eq!(all.len(), 3);
        assert!(all[1].2 && all[1].1.len() == MAX_EVENT_BYTES + 1);
        assert_eq!((all[2].0, all[2].1.as_str(), all[2].2), (3, "after", false));
        // A larger cap keeps the line whole (what `persona produce` sends).
        let mut src = LineSource::open(&path, false, 0, 1)
            .unwrap()
            .with_cap(MAX_EVENT_BYTES * 3);
        src.next_line().unwrap();
        src.clear();
        let whole = src.next_line().unwrap();
        assert_eq!(
            (whole, src.line().len()),
            (
                Next::Line {
                    number: 2,
                    oversize: false
                },
                MAX_EVENT_BYTES * 3
            )
        );
    }

    #[test]
    fn gzip_logs_read_like_plain_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(b"one\ntwo\n").unwrap();
        gz.finish().unwrap();
        assert_eq!(collect(&path, 0, 1).len(), 2);
    }

    #[test]
    fn following_waits_for_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "one\ntw").unwrap();
        let mut src = LineSource::open(&path, true, 0, 1).unwrap();
        assert_eq!(
            src.next_line().unwrap(),
            Next::Line {
                number: 1,
                oversize: false
            }
        );
        src.clear();
        assert_eq!(src.next_line().unwrap(), Next::Wait);
        // The unfinished "tw" is not counted as read.
        assert_eq!(src.offset(), 4);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"o\n")
            .unwrap();
        assert_eq!(
            src.next_line().unwrap(),
            Next::Line {
                number: 2,
                oversize: false
            }
        );
        assert_eq!(src.line(), b"two");
        assert_eq!(src.offset(), 8);
    }
}
