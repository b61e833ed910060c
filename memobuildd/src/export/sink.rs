//! [`Chunks`]: the daemon's sink. An exporter writes into it on a blocking thread; it hands
//! the bytes on in chunks through a bounded channel to the connection's task, which streams
//! them to the client as they come, so an output of any size costs the daemon a few chunks of
//! memory and no disk.

use std::io::{self, Write};

use tokio::sync::mpsc::Sender;

/// Bytes per chunk (one `OutputChunk` frame, well under the frame limit).
pub const CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct Chunks {
    buf: Vec<u8>,
    to: Sender<Vec<u8>>,
}

impl Chunks {
    pub fn new(to: Sender<Vec<u8>>) -> Self {
        Self {
            buf: Vec::with_capacity(CHUNK_BYTES),
            to,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        // The receiver goes when the client does: the export stops as a write to a closed
        // pipe would.
        self.to
            .blocking_send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client stopped receiving"))
    }
}

impl Write for Chunks {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = CHUNK_BYTES - self.buf.len();
        let taken = bytes.len().min(room);
        self.buf.extend_from_slice(&bytes[..taken]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}
