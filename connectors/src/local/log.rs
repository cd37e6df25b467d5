//! A shard's append-only log file: its header, and the buffered cursor that readers, recovery
//! and trimming walk it with.
//!
//! The cursor keeps its file offset and a read buffer between calls, so a reader that comes back
//! for the next batch continues where it stopped instead of scanning the file again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::frame::{decode_frame, Decoded, FrameRef};

/// The first bytes of every shard log: the format and its version.
pub(crate) const LOG_MAGIC: &[u8; 8] = b"SFLOG\x00\x00\x01";
/// Where the first frame starts.
pub(crate) const LOG_HEADER_LEN: u64 = LOG_MAGIC.len() as u64;

/// Bytes read from the file at a time: large enough that a read system call serves about a
/// thousand 100-byte records, small enough that a thousand open readers stay within 128 MiB.
const READ_CHUNK: usize = 128 * 1024;

/// Creates (or empties) a log file holding only the header.
pub(crate) fn create_log(path: &Path, fsync: bool) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(LOG_MAGIC)?;
    if fsync {
        file.sync_all()?;
    }
    Ok(())
}

/// What follows the last whole frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Nothing: the file ends at a frame boundary.
    Clean,
    /// Bytes that are not (yet) a valid frame: a frame still being written, or one torn by a
    /// crash; only a writer that holds the stream's lock can tell the two apart.
    Torn {
        /// Why the bytes are not a frame.
        reason: &'static str,
    },
}

/// The next thing in the log.
#[derive(Debug)]
pub(crate) enum Peek<'a> {
    /// A whole frame of the given length.
    Frame(FrameRef<'a>, usize),
    /// The end of the valid frames.
    Tip(Tail),
}

/// A buffered, forward-only reader of one log file.
#[derive(Debug)]
pub(crate) struct LogCursor {
    file: File,
    buf: Vec<u8>,
    /// The first unconsumed byte in `buf`.
    start: usize,
    /// One past the last byte read into `buf`.
    end: usize,
    /// The file offset of `buf[start]`: the next frame boundary.
    offset: u64,
    header_checked: bool,
}

impl LogCursor {
    /// Opens `path` at its start.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Ok(Self {
            file,
            buf: Vec::new(),
            start: 0,
            end: 0,
            offset: 0,
            header_checked: false,
        })
    }

    /// The file offset of the next frame.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, without consuming it.
    ///
    /// # Errors
    /// On I/O errors, and with [`io::ErrorKind::InvalidData`] if the file is not a shard log.
    pub(crate) fn peek(&mut self) -> io::Result<Peek<'_>> {
        if !self.header_checked {
            if let Some(tail) = self.check_header()? {
                return Ok(Peek::Tip(tail));
            }
        }
        loop {
            match decode_frame(&self.buf[self.start..self.end]) {
                Decoded::Frame(meta) => {
                    return Ok(Peek::Frame(
                        meta.view(&self.buf[self.start..self.end]),
                        meta.len,
                    ));
                }
                Decoded::Corrupt(reason) => return Ok(Peek::Tip(Tail::Torn { reason })),
                Decoded::Incomplete { needed } => {
                    if !self.fill(needed)? {
                        let tail = if self.start == self.end {
                            Tail::Clean
                        } else {
                            Tail::Torn {
                                reason: "partial frame",
                            }
                        };
                        return Ok(Peek::Tip(tail));
                    }
                }
            }
        }
    }

    /// Consumes `len` bytes: the frame [`peek`](Self::peek) returned.
    pub(crate) fn consume(&mut self, len: usize) {
        debug_assert!(
            self.start + len <= self.end,
            "consume only what peek returned"
        );
        self.start += len;
        self.offset += len as u64;
    }

    /// Forgets buffered bytes past the current frame boundary and reads them again next time.
    /// Called at the tip: a writer may complete, or recovery may truncate and rewrite, the bytes
    /// after it.
    pub(crate) fn rewind(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        self.start = 0;
        self.end = 0;
        Ok(())
    }

    /// Checks the header; `Some(tail)` if the file is too short to hold it yet.
    fn check_header(&mut self) -> io::Result<Option<Tail>> {
        let header = LOG_MAGIC.len();
        while self.end - self.start < header {
            if !self.fill(header)? {
                return Ok(Some(if self.start == self.end {
                    Tail::Clean
                } else {
                    Tail::Torn {
                        reason: "partial header",
                    }
                }));
            }
        }
        if &self.buf[self.start..self.start + header] != LOG_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a shardflow local shard log (bad header)",
            ));
        }
        self.consume(header);
        self.header_checked = true;
        Ok(None)
    }

    /// Reads more bytes so that the buffer can hold `needed` bytes from `start`. Returns false at
    /// the end of the file.
    fn fill(&mut self, needed: usize) -> io::Result<bool> {
        if self.buf.is_empty() {
            self.buf = vec![0; READ_CHUNK.max(needed)];
        }
        // Move the unconsumed bytes to the front when the free space runs low or a large frame
        // would not fit, so that reads stay big.
        if self.buf.len() - self.end < READ_CHUNK / 4 || self.start + needed > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if needed > self.buf.len() {
            self.buf.resize(needed, 0);
        }
        loop {
            match self.file.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where the valid frames of a log end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// The offset after the last whole frame (0 if even the header is missing).
    pub(crate) valid_len: u64,
    /// The sequence number of the last whole frame.
    pub(crate) last_sequence: Option<u128>,
    /// What follows it.
    pub(crate) tail: Tail,
}

/// Walks a whole log to the end of its valid frames.
pub(crate) fn scan(path: &Path) -> io::Result<ScanEnd> {
    let mut cursor = LogCursor::open(path)?;
    let mut last_sequence = None;
    loop {
        match cursor.peek()? {
            Peek::Frame(frame, len) => {
                last_sequence = Some(frame.sequence);
                cursor.consume(len);
            }
            Peek::Tip(tail) => {
                return Ok(ScanEnd {
                    valid_len: cursor.offset(),
                    last_sequence,
                    tail,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::encode_frame;
    use super::*;

    fn write_log(path: &Path, records: &[(u128, &[u8])]) -> Vec<u8> {
        let mut bytes = LOG_MAGIC.to_vec();
        for (seq, data) in records {
            encode_frame(&mut bytes, *seq, 0, b"k", data);
        }
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn cursor_reads_every_frame_then_reports_a_clean_tip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let big = vec![7u8; 300 * 1024];
        write_log(&path, &[(1, b"a"), (2, &big), (3, b"c")]);
        let mut cursor = LogCursor::open(&path).unwrap();
        let mut seen = Vec::new();
        loop {
            match cursor.peek().unwrap() {
                Peek::Frame(frame, len) => {
                    seen.push((frame.sequence, frame.data.len()));
                    cursor.consume(len);
                }
                Peek::Tip(tail) => {
                    assert_eq!(tail, Tail::Clean);
                    break;
                }
            }
        }
        assert_eq!(seen, [(1, 1), (2, big.len()), (3, 1)]);
    }

    #[test]
    fn scan_stops_before_a_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let bytes = write_log(&path, &[(1, b"aaaa"), (2, b"bbbb")]);
        let whole = bytes.len() as u64;
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let end = scan(&path).unwrap();
        assert_eq!(end.last_sequence, Some(1));
        assert!(end.valid_len < whole);
        assert!(matches!(end.tail, Tail::Torn { .. }));
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"hello world, not a log").unwrap();
        let err = scan(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
