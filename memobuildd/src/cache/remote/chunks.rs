//! Blob bytes in motion, never whole in memory: [`Chunks`] carries an upload from a local
//! reader (read and hashed on a blocking thread) to a transport; [`Sink`] carries a download
//! from a transport to memory (small blobs) or to a writer on a blocking thread. Both count
//! their progress, so a transfer that stalls can be timed out ([`stalled`]) however long a
//! healthy one takes.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::RemoteError;
use crate::store::{Blob, Digest};

/// Bytes per chunk read from a local file (and per ByteStream message).
pub const CHUNK: usize = 1 << 20;
/// Chunks buffered between the blocking side and the network side.
const IN_FLIGHT: usize = 4;

/// Opens a blob's bytes for reading, on a blocking thread.
pub type Opener = Box<dyn FnOnce() -> std::io::Result<Box<dyn Read + Send>> + Send>;

/// Bytes moved so far; a transfer whose count stops moving has stalled.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `work` until it ends, or fails it when `progress` has not moved for `idle`.
pub async fn stalled<F: Future>(
    idle: Duration,
    progress: &Progress,
    work: F,
) -> Result<F::Output, RemoteError> {
    tokio::pin!(work);
    let mut seen = progress.bytes();
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            () = tokio::time::sleep(idle) => {
                let now = progress.bytes();
                if now == seen {
                    return Err(RemoteError::Timeout { call: "transfer", after: idle });
                }
                seen = now;
            }
        }
    }
}

/// An upload's bytes, in order. The last chunk is released only after the whole content
/// hashed to the blob's digest, so a local copy that changed or rotted is never published
/// under the wrong name: the stream ends with an error instead, and the transport aborts.
#[derive(Debug)]
pub struct Chunks {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    progress: Progress,
}

impl Chunks {
    /// Bytes already in memory (result blobs: made here, so not hashed again).
    pub fn from_bytes(bytes: Bytes) -> Self {
        let (tx, rx) = mpsc::channel(1);
        tx.try_send(Ok(bytes)).expect("a fresh channel has room");
        Self {
            rx,
            progress: Progress::default(),
        }
    }

    /// `blob`'s bytes read through `open` on a blocking thread, checked against its digest
    /// and size.
    pub fn from_reader(blob: Blob, open: Opener) -> Self {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        tokio::task::spawn_blocking(move || {
            if let Err(err) = read_checked(&blob, open, &tx) {
                let _ = tx.blocking_send(Err(err));
            }
        });
        Self {
            rx,
            progress: Progress::default(),
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    pub async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        let chunk = self.rx.recv().await;
        if let Some(Ok(bytes)) = &chunk {
            self.progress.add(bytes.len());
        }
        chunk
    }

    /// The whole content (small blobs, for batch requests), refusing more than `limit`.
    pub async fn collect(mut self, limit: u64) -> std::io::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next().await {
            all.extend_from_slice(&chunk?);
            if all.len() as u64 > limit {
                return Err(std::io::Error::other("more bytes than the blob's size"));
            }
        }
        Ok(all)
    }

    /// As a stream, for request bodies.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold(self, |mut chunks| async move {
            chunks.next().await.map(|chunk| (chunk, chunks))
        })
    }
}

fn read_checked(
    blob: &Blob,
    open: Opener,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    let mut reader = open()?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut held: Option<Bytes> = None;
    loop {
        let mut buf = vec![0; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        hasher.update(&buf);
        size += filled as u64;
        if size > blob.size {
            break;
        }
        if let Some(previous) = held.replace(Bytes::from(buf))
            && tx.blocking_send(Ok(previous)).is_err()
        {
            // The transport gave up; nobody is listening.
            return Ok(());
        }
    }
    let actual = Digest::from_hasher(hasher);
    if size != blob.size || actual != blob.digest {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the local copy of {} ({} bytes) reads as {actual} ({size} bytes or more)",
                blob.digest, blob.size
            ),
        ));
    }
    if let Some(last) = held {
        let _ = tx.blocking_send(Ok(last));
    }
    Ok(())
}

/// Where a download's bytes go. Transports [`push`](Self::push) chunks as they arrive; the
/// size limit is enforced here, the digest by whoever made the sink (after the last chunk).
#[derive(Debug)]
pub struct Sink {
    to: SinkTo,
    limit: u64,
    received: u64,
    progress: Progress,
}

#[derive(Debug)]
enum SinkTo {
    Memory(Vec<u8>),
    Writer(mpsc::Sender<Bytes>),
}

/// What a writer sink's blocking side ends with: the writer, and what it was given.
pub type Written<W> = std::io::Result<(W, Digest, u64)>;

impl Sink {
    /// Collects up to `limit` bytes in memory (small blobs, entries).
    pub fn memory(limit: u64) -> Self {
        Self::new(SinkTo::Memory(Vec::new()), limit)
    }

    /// Streams into `writer` on a blocking thread, hashing as it writes; the handle yields
    /// the writer and the digest and size of what it got, once the sink is dropped.
    pub fn writer<W: Write + Send + 'static>(
        blob: &Blob,
        mut writer: W,
    ) -> (Self, tokio::task::JoinHandle<Written<W>>) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                writer.write_all(&chunk)?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
            }
            writer.flush()?;
            Ok((writer, Digest::from_hasher(hasher), size))
        });
        (Self::new(SinkTo::Writer(tx), blob.size), task)
    }

    fn new(to: SinkTo, limit: u64) -> Self {
        Self {
            to,
            limit,
            received: 0,
            progress: Progress::default(),
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    pub async fn push(&mut self, chunk: Bytes) -> Result<(), RemoteError> {
        self.received += chunk.len() as u64;
        if self.received > self.limit {
            return Err(RemoteError::Protocol(
                "the server sent more bytes than the blob's size",
            ));
        }
        self.progress.add(chunk.len());
        match &mut self.to {
            SinkTo::Memory(bytes) => bytes.extend_from_slice(&chunk),
            SinkTo::Writer(tx) => tx
                .send(chunk)
                .await
                .map_err(|_| RemoteError::Local(std::io::Error::other("the writer stopped")))?,
        }
        Ok(())
    }

    /// The bytes of a memory sink.
    pub fn into_bytes(self) -> Vec<u8> {
        match self.to {
            SinkTo::Memory(bytes) => bytes,
            SinkTo::Writer(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(bytes: &[u8]) -> Blob {
        Blob {
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
        }
    }

    fn opener(bytes: Vec<u8>) -> Opener {
        Box::new(move || Ok(Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read + Send>))
    }

    #[tokio::test]
    async fn a_reader_streams_in_chunks_and_is_checked_before_its_end() {
        let content: Vec<u8> = (0..CHUNK * 2 + 5).map(|i| (i % 251) as u8).collect();
        let chunks = Chunks::from_reader(blob(&content), opener(content.clone()));
        let progress = chunks.progress();
        let all = chunks.collect(u64::MAX).await.expect("good content");
        assert_eq!(all, content);
        assert_eq!(progress.bytes(), content.len() as u64);

        let mut changed = Chunks::from_reader(blob(&content), opener(vec![7; CHUNK * 2 + 5]));
        let mut good = 0;
        let err = loop {
            match changed.next().await.expect("an error before the end") {
                Ok(chunk) => good += chunk.len(),
                Err(err) => break err,
            }
        };
        assert!(good < content.len(), "the last chunk is held back");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        let longer = Chunks::from_reader(blob(b"abc"), opener(b"abcd".to_vec()));
        assert!(longer.collect(u64::MAX).await.is_err());
    }

    #[tokio::test]
    async fn sinks_enforce_the_size_and_hash_what_they_write() {
        let content = b"layer bytes".to_vec();
        let (mut sink, task) = Sink::writer(&blob(&content), Vec::new());
        sink.push(Bytes::from_static(b"layer "))
            .await
            .expect("push");
        sink.push(Bytes::from_static(b"bytes")).await.expect("push");
        assert!(
            sink.push(Bytes::from_static(b"!")).await.is_err(),
            "too long"
        );
        drop(sink);
        let (written, digest, size) = task.await.expect("join").expect("write");
        assert_eq!(
            (written, digest, size),
            (content.clone(), blob(&content).digest, 11)
        );

        let mut memory = Sink::memory(content.len() as u64);
        memory
            .push(Bytes::from(content.clone()))
            .await
            .expect("push");
        assert_eq!(memory.into_bytes(), content);
    }

    #[tokio::test]
    async fn a_stalled_transfer_times_out_and_a_moving_one_does_not() {
        let progress = Progress::default();
        let idle = Duration::from_millis(50);
        let stuck = stalled(idle, &progress, std::future::pending::<()>()).await;
        assert!(matches!(stuck, Err(RemoteError::Timeout { .. })));
        let moving = progress.clone();
        let slow_but_alive = async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                moving.add(1);
            }
        };
        assert!(stalled(idle, &progress, slow_but_alive).await.is_ok());
    }
}
