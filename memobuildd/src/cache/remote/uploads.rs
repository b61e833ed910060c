//! The background upload queue: an upload is accepted or refused at once (never waited for),
//! bounded in entries, bytes and concurrency; a second upload of an entry already queued is
//! skipped. [`Uploads::flush`] is the graceful stop: it waits, bounded, for what is queued and
//! reports what it had to drop. What an upload does (find missing blobs, send them, write the
//! entry) is the caller's future; this module only schedules it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::store::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Entries queued or running.
    pub entries: usize,
    /// Bytes of the blobs those entries may upload.
    pub bytes: u64,
    /// Entries uploading at once.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// The same entry is queued or uploading already.
    Duplicate,
    /// Over the entry or byte bound: dropped.
    Full,
    /// After [`Uploads::flush`]: dropped.
    Closed,
}

/// What a flush left undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushReport {
    pub dropped_entries: u64,
    pub dropped_bytes: u64,
}

#[derive(Debug, Default)]
struct Pending {
    entries: HashMap<Digest, u64>,
    bytes: u64,
    closed: bool,
}

#[derive(Debug)]
pub struct Uploads {
    limits: QueueLimits,
    pending: Mutex<Pending>,
    permits: Arc<Semaphore>,
    tasks: Mutex<JoinSet<()>>,
    /// Entries pending, for flush to wait on.
    depth: watch::Sender<usize>,
    done: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// Counts for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub entries: u64,
    pub bytes: u64,
    pub done: u64,
    pub failed: u64,
    pub dropped: u64,
}

impl Uploads {
    pub fn new(limits: QueueLimits) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            limits,
            pending: Mutex::default(),
            tasks: Mutex::default(),
            depth: watch::Sender::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `work` (which says whether it succeeded) for entry `id`, which will upload up
    /// to `bytes`. Must be called within a tokio runtime.
    pub fn enqueue<F>(self: &Arc<Self>, id: Digest, bytes: u64, work: F) -> Enqueued
    where
        F: Future<Output = bool> + Send + 'static,
    {
        {
            let mut pending = self.pending();
            if pending.closed {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Enqueued::Closed;
            }
            if pending.entries.contains_key(&id) {
                return Enqueued::Duplicate;
            }
            if pending.entries.len() >= self.limits.entries
                || pending.bytes.saturating_add(bytes) > self.limits.bytes
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Enqueued::Full;
            }
            pending.entries.insert(id.clone(), bytes);
            pending.bytes += bytes;
            self.depth.send_replace(pending.entries.len());
        }
        let this = Arc::clone(self);
        let permits = Arc::clone(&self.permits);
        let mut tasks = self.tasks();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let succeeded = match permits.acquire_owned().await {
                Ok(_permit) => work.await,
                Err(_) => false,
            };
            let counter = if succeeded { &this.done } else { &this.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut pending = this.pending();
            if let Some(bytes) = pending.entries.remove(&id) {
                pending.bytes -= bytes;
            }
            this.depth.send_replace(pending.entries.len());
        });
        Enqueued::Queued
    }

    pub fn stats(&self) -> QueueStats {
        let pending = self.pending();
        QueueStats {
            entries: pending.entries.len() as u64,
            bytes: pending.bytes,
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits up to `timeout` until nothing is queued or uploading; says whether that came.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let mut depth = self.depth.subscribe();
        tokio::time::timeout(timeout, depth.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// Refuses new uploads, waits up to `timeout` for the queued ones, and cancels and
    /// reports what is left.
    pub async fn flush(&self, timeout: Duration) -> FlushReport {
        self.pending().closed = true;
        self.settle(timeout).await;
        self.tasks().abort_all();
        let mut pending = self.pending();
        let report = FlushReport {
            dropped_entries: pending.entries.len() as u64,
            dropped_bytes: pending.bytes,
        };
        self.dropped
            .fetch_add(report.dropped_entries, Ordering::Relaxed);
        pending.entries.clear();
        pending.bytes = 0;
        self.depth.send_replace(0);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn limits() -> QueueLimits {
        QueueLimits {
            entries: 3,
            bytes: 100,
            concurrency: 1,
        }
    }

    #[tokio::test]
    async fn bounded_deduplicated_and_never_waited_for() {
        let uploads = Uploads::new(limits());
        let gate = Arc::new(Semaphore::new(0));
        let blocked = |gate: &Arc<Semaphore>| {
            let gate = Arc::clone(gate);
            async move {
                gate.acquire().await.is_ok_and(|p| {
                    p.forget();
                    true
                })
            }
        };
        assert_eq!(uploads.enqueue(id(1), 40, blocked(&gate)), Enqueued::Queued);
        assert_eq!(
            uploads.enqueue(id(1), 40, blocked(&gate)),
            Enqueued::Duplicate
        );
        assert_eq!(uploads.enqueue(id(2), 40, blocked(&gate)), Enqueued::Queued);
        assert_eq!(
            uploads.enqueue(id(3), 40, blocked(&gate)),
            Enqueued::Full,
            "bytes"
        );
        assert_eq!(uploads.enqueue(id(3), 20, blocked(&gate)), Enqueued::Queued);
        assert_eq!(
            uploads.enqueue(id(4), 0, blocked(&gate)),
            Enqueued::Full,
            "entries"
        );
        let stats = uploads.stats();
        assert_eq!((stats.entries, stats.bytes, stats.dropped), (3, 100, 2));
        gate.add_permits(3);
        let report = uploads.flush(Duration::from_secs(10)).await;
        assert_eq!(report, FlushReport::default());
        let stats = uploads.stats();
        assert_eq!((stats.entries, stats.done, stats.failed), (0, 3, 0));
        assert_eq!(uploads.enqueue(id(5), 1, async { true }), Enqueued::Closed);
    }

    #[tokio::test]
    async fn a_flush_that_times_out_cancels_and_reports_what_it_dropped() {
        let uploads = Uploads::new(QueueLimits {
            concurrency: 2,
            ..limits()
        });
        let ran = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&ran);
        uploads.enqueue(id(1), 10, async move {
            std::future::pending::<()>().await;
            counter.fetch_add(1, Ordering::Relaxed);
            true
        });
        uploads.enqueue(id(2), 5, async { false });
        let report = uploads.flush(Duration::from_millis(100)).await;
        assert_eq!(
            report,
            FlushReport {
                dropped_entries: 1,
                dropped_bytes: 10
            }
        );
        let stats = uploads.stats();
        assert_eq!((stats.entries, stats.failed, stats.dropped), (0, 1, 1));
        assert_eq!(ran.load(Ordering::Relaxed), 0);
    }
}
