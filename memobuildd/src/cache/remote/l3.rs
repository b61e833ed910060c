//! [`L3`], the remote tier: look-ups that trust nothing unverified, uploads in the background,
//! and a remote that can fail or hang without failing anything.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OnceCell, broadcast};
use tracing::Instrument as _;

use super::breaker::{Breaker, Change};
use super::chunks::{Progress, stalled};
use super::grpc::GrpcCache;
use super::http::HttpCache;
use super::mapping::{self, Entry, MAX_RESULT_BLOB, RemoteLayer, RemoteResult};
use super::settings::{Protocol, RemoteMode, RemoteSettings};
use super::signing::Signer;
use super::uploads::{Enqueued, FlushReport, QueueLimits, Uploads};
use super::{Capabilities, Chunks, RemoteCache, RemoteError, Sink};
use crate::cache::tier::{Tier, TierError};
use crate::context::Hash;
use crate::store::{Blob, Digest};

/// Where uploads read layers from: the uncompressed tar of a layer, opened on a blocking
/// thread. The store implements it; uploads never hold a layer in memory.
pub trait LayerSource: Send + Sync + std::fmt::Debug {
    fn open(&self, layer: &RemoteLayer) -> std::io::Result<Box<dyn Read + Send>>;
}

/// Timeouts, breaker and queue bounds.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub connect_timeout: Duration,
    /// For one request with a small answer (an entry, a batch, find-missing).
    pub request_timeout: Duration,
    /// For a transfer whose bytes stop moving (a blob streamed either way).
    pub idle_timeout: Duration,
    /// Failures in a row that make the remote skipped.
    pub failures_to_open: u32,
    /// How long it is skipped before the first probe; doubles per failed probe up to the max.
    pub retry_after: Duration,
    pub max_retry_after: Duration,
    pub uploads: QueueLimits,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            failures_to_open: 3,
            retry_after: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(300),
            uploads: QueueLimits {
                entries: 1024,
                bytes: 8 << 30,
                concurrency: 4,
            },
        }
    }
}

/// What the remote tier tells the user about, once per occurrence: the engine forwards these
/// into a build's progress stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteEvent {
    /// The remote failed repeatedly: builds go on local-only until it recovers.
    Unavailable {
        endpoint: String,
        error: String,
    },
    Recovered {
        endpoint: String,
    },
    /// An entry was not signed with this daemon's secret; it was ignored.
    BadSignature {
        action: Digest,
    },
    /// A blob did not hash to its digest; it was not used.
    CorruptBlob {
        blob: Digest,
        actual: Digest,
    },
}

/// The remote tier's state and counters, for `memobuild status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    pub endpoint: String,
    pub mode: RemoteMode,
    /// False while the breaker keeps the remote skipped.
    pub healthy: bool,
    pub last_error: Option<String>,
    pub hits: u64,
    pub misses: u64,
    pub bad_signatures: u64,
    pub corrupt_blobs: u64,
    /// Failed requests (outages, protocol errors), including those behind misses.
    pub errors: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub upload_queue: u64,
    pub upload_queue_bytes: u64,
    pub uploads_done: u64,
    pub uploads_failed: u64,
    pub uploads_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bad_signatures: AtomicU64,
    corrupt_blobs: AtomicU64,
    errors: AtomicU64,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
}

/// The remote cache tier. Cheap to clone; every clone is the same tier.
#[derive(Debug, Clone)]
pub struct L3 {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    remote: Arc<dyn RemoteCache>,
    mode: RemoteMode,
    signer: Option<Signer>,
    options: RemoteOptions,
    breaker: Breaker,
    capabilities: OnceCell<Capabilities>,
    counters: Counters,
    last_error: Mutex<Option<String>>,
    events: broadcast::Sender<RemoteEvent>,
    layers: Arc<dyn LayerSource>,
    uploads: Arc<Uploads>,
}

impl L3 {
    /// The tier the settings describe, `None` when their mode is off. Sends nothing yet:
    /// a remote that is down now costs nothing until it is used.
    pub fn connect(
        settings: &RemoteSettings,
        options: RemoteOptions,
        layers: Arc<dyn LayerSource>,
    ) -> Result<Option<Self>, RemoteError> {
        if settings.mode == RemoteMode::Off {
            return Ok(None);
        }
        let (endpoint, auth, ca) = (
            &settings.endpoint,
            settings.auth.as_ref(),
            settings.ca_file.as_deref(),
        );
        let remote: Arc<dyn RemoteCache> = match endpoint.protocol {
            Protocol::Grpc => {
                Arc::new(GrpcCache::new(endpoint, auth, ca, options.connect_timeout)?)
            }
            Protocol::Http => {
                Arc::new(HttpCache::new(endpoint, auth, ca, options.connect_timeout)?)
            }
        };
        let signer = settings.secret.as_ref().map(Signer::new);
        Ok(Some(Self::new(
            remote,
            settings.mode,
            signer,
            options,
            layers,
        )))
    }

    pub fn new(
        remote: Arc<dyn RemoteCache>,
        mode: RemoteMode,
        signer: Option<Signer>,
        options: RemoteOptions,
        layers: Arc<dyn LayerSource>,
    ) -> Self {
        let breaker = Breaker::new(
            options.failures_to_open,
            options.retry_after,
            options.max_retry_after,
            options.request_timeout * 4,
        );
        Self {
            shared: Arc::new(Shared {
                remote,
                mode,
                signer,
                breaker,
                capabilities: OnceCell::new(),
                counters: Counters::default(),
                last_error: Mutex::new(None),
                events: broadcast::channel(64).0,
                layers,
                uploads: Uploads::new(options.uploads),
                options,
            }),
        }
    }

    /// As configured: read-write or read-only (an off remote is no `L3` at all).
    pub fn mode(&self) -> RemoteMode {
        self.shared.mode
    }

    /// The transport, for tests and tools that speak to the remote directly.
    pub fn remote(&self) -> &Arc<dyn RemoteCache> {
        &self.shared.remote
    }

    /// Events from now on (see [`RemoteEvent`]).
    pub fn events(&self) -> broadcast::Receiver<RemoteEvent> {
        self.shared.events.subscribe()
    }

    /// A verified hit for `key`: an entry under its action digest whose result blob matches
    /// its digest and (with a secret) its signature, and whose layer blobs the remote still
    /// has. Anything else — including every remote failure — is a miss.
    pub async fn lookup(&self, key: &Hash) -> Option<RemoteResult> {
        let span = tracing::debug_span!("l3_lookup", key = %hex::encode(key));
        let found = self.shared.find(key).instrument(span).await;
        let counter = if found.is_some() {
            &self.shared.counters.hits
        } else {
            &self.shared.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Queues `result` for upload under `key` and returns at once. Read-only: does nothing.
    pub fn store(&self, key: &Hash, result: &RemoteResult) {
        let shared = &self.shared;
        if shared.mode != RemoteMode::ReadWrite {
            return;
        }
        let entry = mapping::encode(&mapping::action_digest(key), result, shared.signer.as_ref());
        let bytes = entry.result_blob.size + result.layers.iter().map(|l| l.size).sum::<u64>();
        let id = entry.action.digest.clone();
        let span = tracing::debug_span!("l3_upload", action = %id, bytes);
        let job = Arc::clone(shared)
            .upload(entry, result.layers.clone())
            .instrument(span);
        match shared.uploads.enqueue(id.clone(), bytes, job) {
            Enqueued::Queued | Enqueued::Duplicate => {}
            Enqueued::Full => tracing::warn!(
                action = %id, bytes,
                "remote cache upload queue full: this result is not uploaded"
            ),
            Enqueued::Closed => tracing::debug!(action = %id, "shutting down: not uploaded"),
        }
    }

    /// Downloads `layer`'s tar into `into`, verified against its diff-id on the way; `None`
    /// when the remote does not have it, fails, or sends something else (then reported).
    pub async fn fetch_layer<W: Write + Send + 'static>(
        &self,
        layer: &RemoteLayer,
        into: W,
    ) -> Option<W> {
        let shared = &self.shared;
        if !shared.ready().await {
            return None;
        }
        let blob = layer.blob();
        let (mut sink, written) = Sink::writer(&blob, into);
        let progress = sink.progress();
        let span = tracing::debug_span!("l3_fetch", blob = %blob.digest, size = blob.size);
        let found = shared
            .transfer(&progress, shared.remote.download(&blob, &mut sink))
            .instrument(span)
            .await;
        drop(sink);
        let written = written.await.expect("the blob writer does not panic");
        if !matches!(found, Ok(true)) {
            return None;
        }
        let (into, digest, size) = match written {
            Ok(written) => written,
            Err(err) => {
                tracing::warn!(blob = %blob.digest, error = %err, "writing a remote blob failed");
                return None;
            }
        };
        shared.verified(&blob, digest, size).then_some(into)
    }

    /// Waits up to `timeout` until every queued upload has ended (done or failed); says
    /// whether they all did. New uploads stay welcome, unlike [`Self::flush`].
    pub async fn uploaded(&self, timeout: Duration) -> bool {
        self.shared.uploads.settle(timeout).await
    }

    /// Stops taking uploads, waits up to `timeout` for the queued ones and logs what it
    /// dropped.
    pub async fn flush(&self, timeout: Duration) -> FlushReport {
        let report = self.shared.uploads.flush(timeout).await;
        if report.dropped_entries > 0 {
            tracing::warn!(
                entries = report.dropped_entries,
                bytes = report.dropped_bytes,
                "remote cache uploads dropped at shutdown"
            );
        }
        report
    }

    pub fn status(&self) -> RemoteStatus {
        let shared = &self.shared;
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &shared.counters;
        let queue = shared.uploads.stats();
        RemoteStatus {
            endpoint: shared.remote.endpoint(),
            mode: shared.mode,
            healthy: shared.breaker.is_closed(),
            last_error: shared
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            hits: count(&c.hits),
            misses: count(&c.misses),
            bad_signatures: count(&c.bad_signatures),
            corrupt_blobs: count(&c.corrupt_blobs),
            errors: count(&c.errors),
            bytes_down: count(&c.bytes_down),
            bytes_up: count(&c.bytes_up),
            upload_queue: queue.entries,
            upload_queue_bytes: queue.bytes,
            uploads_done: queue.done,
            uploads_failed: queue.failed,
            uploads_dropped: queue.dropped,
        }
    }
}

impl Shared {
    /// Whether the remote may be used now: it is not switched off, the breaker lets this
    /// operation through, and the server's capabilities (asked once) allow SHA-256.
    async fn ready(&self) -> bool {
        if self.mode == RemoteMode::Off || !self.breaker.admit() {
            return false;
        }
        self.capabilities
            .get_or_try_init(|| self.call("GetCapabilities", self.remote.capabilities()))
            .await
            .is_ok()
    }

    async fn find(&self, key: &Hash) -> Option<RemoteResult> {
        if !self.ready().await {
            return None;
        }
        let action = mapping::action_digest(key);
        let entry = self
            .call("GetActionResult", self.remote.get_action(&action))
            .await
            .ok()??;
        let result_blob = match mapping::result_blob_of(&entry) {
            Ok(blob) if blob.size <= MAX_RESULT_BLOB => blob,
            Ok(blob) => {
                tracing::debug!(action = %action.digest, size = blob.size, "result blob too big");
                return None;
            }
            Err(err) => {
                tracing::debug!(action = %action.digest, error = %err, "not a MemoBuild entry");
                return None;
            }
        };
        let mut sink = Sink::memory(result_blob.size);
        let progress = sink.progress();
        let found = self
            .transfer(&progress, self.remote.download(&result_blob, &mut sink))
            .await
            .ok()?;
        if !found {
            return None;
        }
        let bytes = sink.into_bytes();
        let size = bytes.len() as u64;
        if !self.verified(&result_blob, Digest::of(&bytes), size) {
            return None;
        }
        let result = match mapping::decode(&action, &bytes, self.signer.as_ref()) {
            Ok(result) => result,
            Err(err) if err.is_signature() => {
                self.counters.bad_signatures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(action = %action.digest, error = %err, "remote cache entry ignored");
                let _ = self.events.send(RemoteEvent::BadSignature {
                    action: action.digest,
                });
                return None;
            }
            Err(err) => {
                tracing::debug!(action = %action.digest, error = %err, "remote entry unreadable");
                return None;
            }
        };
        // Servers may keep an entry whose blobs they evicted: ask before trusting it.
        let blobs: Vec<Blob> = result.layers.iter().map(RemoteLayer::blob).collect();
        if !blobs.is_empty() {
            let missing = self
                .call("FindMissingBlobs", self.remote.find_missing(&blobs))
                .await
                .ok()?;
            if !missing.is_empty() {
                tracing::debug!(action = %action.digest, missing = missing.len(), "layers evicted");
                return None;
            }
        }
        Some(result)
    }

    /// Checks what arrived for `blob`; a mismatch is counted and reported.
    fn verified(&self, blob: &Blob, actual: Digest, size: u64) -> bool {
        if actual == blob.digest && size == blob.size {
            self.counters.bytes_down.fetch_add(size, Ordering::Relaxed);
            return true;
        }
        self.counters.corrupt_blobs.fetch_add(1, Ordering::Relaxed);
        let error = RemoteError::Corrupt {
            expected: blob.digest.clone(),
            actual: actual.clone(),
            size,
        };
        tracing::warn!(error = %error, "corrupt blob from the remote cache: not used");
        let _ = self.events.send(RemoteEvent::CorruptBlob {
            blob: blob.digest.clone(),
            actual,
        });
        false
    }

    /// Uploads what the remote is missing of `entry`, then the entry itself (last, so an
    /// entry never names a blob the remote lacks). Says whether it all went through.
    async fn upload(self: Arc<Self>, entry: Entry, layers: Vec<RemoteLayer>) -> bool {
        if !self.ready().await {
            return false;
        }
        if self.capabilities.get().is_some_and(|c| !c.action_updates) {
            tracing::debug!("the remote refuses action cache updates: nothing uploaded");
            return false;
        }
        let mut blobs = vec![entry.result_blob.clone()];
        for layer in &layers {
            let blob = layer.blob();
            if !blobs.contains(&blob) {
                blobs.push(blob);
            }
        }
        let Ok(missing) = self
            .call("FindMissingBlobs", self.remote.find_missing(&blobs))
            .await
        else {
            return false;
        };
        for blob in missing {
            let data = if blob == entry.result_blob {
                Chunks::from_bytes(entry.result_bytes.clone())
            } else {
                let Some(layer) = layers.iter().find(|l| l.blob() == blob).cloned() else {
                    continue;
                };
                let source = Arc::clone(&self.layers);
                Chunks::from_reader(blob.clone(), Box::new(move || source.open(&layer)))
            };
            let progress = data.progress();
            if let Err(err) = self
                .transfer(&progress, self.remote.upload(&blob, data))
                .await
            {
                tracing::debug!(blob = %blob.digest, error = %err, "upload failed");
                return false;
            }
            self.counters
                .bytes_up
                .fetch_add(blob.size, Ordering::Relaxed);
        }
        self.call(
            "UpdateActionResult",
            self.remote
                .update_action(&entry.action, &entry.action_result),
        )
        .await
        .is_ok()
    }

    /// One request, bounded by the request timeout; its outcome feeds the breaker.
    async fn call<T>(
        &self,
        call: &'static str,
        work: impl Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let after = self.options.request_timeout;
        let outcome = match tokio::time::timeout(after, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(RemoteError::Timeout { call, after }),
        };
        self.note(&outcome);
        outcome
    }

    /// A streamed transfer, failed only when its bytes stop moving for the idle timeout.
    async fn transfer<T>(
        &self,
        progress: &Progress,
        work: impl Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let outcome = stalled(self.options.idle_timeout, progress, work)
            .await
            .and_then(|outcome| outcome);
        self.note(&outcome);
        outcome
    }

    fn note<T>(&self, outcome: &Result<T, RemoteError>) {
        let endpoint = || self.remote.endpoint();
        match outcome {
            Ok(_) => {
                if self.breaker.success() == Some(Change::Recovered) {
                    tracing::info!(endpoint = %endpoint(), "remote cache reachable again");
                    let _ = self.events.send(RemoteEvent::Recovered {
                        endpoint: endpoint(),
                    });
                }
            }
            Err(err) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                if !err.is_outage() {
                    tracing::debug!(error = %err, "remote cache request failed");
                    return;
                }
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(err.to_string());
                if self.breaker.failure() == Some(Change::Opened) {
                    tracing::warn!(
                        endpoint = %endpoint(), error = %err,
                        "remote cache unavailable: building with local caches only until it recovers"
                    );
                    let _ = self.events.send(RemoteEvent::Unavailable {
                        endpoint: endpoint(),
                        error: err.to_string(),
                    });
                }
            }
        }
    }
}

#[async_trait]
impl Tier<RemoteResult> for L3 {
    fn name(&self) -> &'static str {
        "L3"
    }

    async fn get(&self, key: &Hash) -> Result<Option<RemoteResult>, TierError> {
        Ok(self.lookup(key).await)
    }

    async fn put(&self, key: &Hash, value: &RemoteResult) -> Result<(), TierError> {
        self.store(key, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::memory::MemoryCache;
    use super::super::settings::Secret;
    use super::*;
    use crate::cache::tier::suite;

    /// Layers kept in memory, by diff-id.
    #[derive(Debug, Default)]
    struct Layers(Mutex<HashMap<Digest, Vec<u8>>>);

    impl Layers {
        fn add(&self, bytes: &[u8]) -> RemoteLayer {
            let layer = RemoteLayer {
                diff_id: Digest::of(bytes),
                size: bytes.len() as u64,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                content_id: *blake3::hash(bytes).as_bytes(),
            };
            self.0
                .lock()
                .expect("lock")
                .insert(layer.diff_id.clone(), bytes.to_vec());
            layer
        }
    }

    impl LayerSource for Layers {
        fn open(&self, layer: &RemoteLayer) -> std::io::Result<Box<dyn Read + Send>> {
            let bytes = self.0.lock().expect("lock").get(&layer.diff_id).cloned();
            let bytes = bytes.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
            Ok(Box::new(std::io::Cursor::new(bytes)))
        }
    }

    fn options() -> RemoteOptions {
        RemoteOptions {
            request_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            retry_after: Duration::from_millis(200),
            ..RemoteOptions::default()
        }
    }

    struct Setup {
        remote: Arc<MemoryCache>,
        layers: Arc<Layers>,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                remote: Arc::default(),
                layers: Arc::default(),
            }
        }

        fn l3(&self, mode: RemoteMode, secret: Option<&str>) -> L3 {
            L3::new(
                Arc::clone(&self.remote) as Arc<dyn RemoteCache>,
                mode,
                secret.map(|s| Signer::new(&Secret::new(s))),
                options(),
                Arc::clone(&self.layers) as Arc<dyn LayerSource>,
            )
        }

        /// A result of `n` layers, `n`'s own bytes (one shared by all results).
        fn result(&self, n: usize) -> RemoteResult {
            let mut layers = vec![self.layers.add(b"shared base layer")];
            layers.extend((1..n).map(|i| {
                self.layers
                    .add(format!("layer {n}.{i} ").repeat(300).as_bytes())
            }));
            layers.truncate(n);
            RemoteResult { layers }
        }
    }

    async fn uploaded(l3: &L3) {
        assert!(l3.uploaded(Duration::from_secs(10)).await, "uploads settle");
    }

    #[tokio::test]
    async fn the_tier_suite_holds_over_a_remote() {
        let setup = Setup::new();
        let l3 = setup.l3(RemoteMode::ReadWrite, Some("s"));
        let values: Vec<RemoteResult> = (0..3).map(|n| setup.result(n)).collect();
        suite::check(&l3, &values, async || uploaded(&l3).await, suite::keys(1)).await;
    }

    #[tokio::test]
    async fn another_machine_gets_a_verified_hit_and_its_layers() {
        let setup = Setup::new();
        let writer = setup.l3(RemoteMode::ReadWrite, Some("team"));
        let result = setup.result(3);
        writer.store(&[1; 32], &result);
        uploaded(&writer).await;
        writer.store(&[2; 32], &setup.result(2));
        uploaded(&writer).await;
        let status = writer.status();
        assert_eq!((status.uploads_done, status.uploads_failed), (2, 0));
        assert_eq!(
            setup.remote.uploads.load(Ordering::Relaxed),
            2 + 4,
            "two result blobs and four layers: the shared one went up once"
        );

        let reader = setup.l3(RemoteMode::ReadOnly, Some("team"));
        assert_eq!(reader.lookup(&[1; 32]).await, Some(result.clone()));
        assert_eq!(reader.lookup(&[3; 32]).await, None);
        for layer in &result.layers {
            let bytes = reader.fetch_layer(layer, Vec::new()).await.expect("layer");
            assert_eq!(Digest::of(&bytes), layer.diff_id);
        }
        let status = reader.status();
        assert_eq!((status.hits, status.misses, status.bytes_up), (1, 1, 0));
        assert!(status.bytes_down >= result.layers.iter().map(|l| l.size).sum::<u64>());
        assert!(status.healthy);
    }

    #[tokio::test]
    async fn entries_signed_otherwise_are_counted_reported_and_not_used() {
        let setup = Setup::new();
        let theirs = setup.l3(RemoteMode::ReadWrite, Some("their secret"));
        let unsigned = setup.l3(RemoteMode::ReadWrite, None);
        theirs.store(&[1; 32], &setup.result(2));
        unsigned.store(&[2; 32], &setup.result(1));
        uploaded(&theirs).await;
        uploaded(&unsigned).await;

        let ours = setup.l3(RemoteMode::ReadWrite, Some("our secret"));
        let mut events = ours.events();
        assert_eq!(ours.lookup(&[1; 32]).await, None, "wrong secret");
        assert_eq!(ours.lookup(&[2; 32]).await, None, "no signature");
        assert_eq!(ours.status().bad_signatures, 2);
        assert!(matches!(
            events.try_recv(),
            Ok(RemoteEvent::BadSignature { .. })
        ));
        assert!(
            unsigned.lookup(&[1; 32]).await.is_some(),
            "without a secret nothing is checked"
        );
    }

    #[tokio::test]
    async fn corrupt_and_evicted_blobs_are_misses() {
        let setup = Setup::new();
        let l3 = setup.l3(RemoteMode::ReadWrite, None);
        let result = setup.result(2);
        l3.store(&[1; 32], &result);
        uploaded(&l3).await;
        let layer = &result.layers[1];
        setup
            .remote
            .blobs()
            .get_mut(&layer.diff_id)
            .expect("uploaded")[0] ^= 1;
        let mut events = l3.events();
        assert!(l3.fetch_layer(layer, Vec::new()).await.is_none());
        assert_eq!(l3.status().corrupt_blobs, 1);
        assert!(matches!(
            events.try_recv(),
            Ok(RemoteEvent::CorruptBlob { .. })
        ));

        setup.remote.blobs().remove(&layer.diff_id);
        assert_eq!(l3.lookup(&[1; 32]).await, None, "a layer was evicted");

        let entry = setup
            .remote
            .actions()
            .get(&mapping::action_digest(&[1; 32]).digest)
            .cloned()
            .expect("entry");
        let result_blob = mapping::result_blob_of(&entry).expect("ours");
        setup
            .remote
            .blobs()
            .get_mut(&result_blob.digest)
            .expect("result blob")[20] ^= 1;
        assert_eq!(l3.lookup(&[1; 32]).await, None);
        assert_eq!(l3.status().corrupt_blobs, 2);
    }

    #[tokio::test]
    async fn a_dead_remote_opens_the_breaker_once_and_recovery_closes_it() {
        let setup = Setup::new();
        let l3 = setup.l3(RemoteMode::ReadWrite, None);
        let mut events = l3.events();
        setup.remote.down.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(l3.lookup(&[1; 32]).await, None);
        }
        assert!(matches!(
            events.try_recv(),
            Ok(RemoteEvent::Unavailable { .. })
        ));
        let asked = setup.remote.requests.load(Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(l3.lookup(&[1; 32]).await, None);
            l3.store(&[2; 32], &setup.result(1));
        }
        uploaded(&l3).await;
        assert_eq!(
            setup.remote.requests.load(Ordering::Relaxed),
            asked,
            "open: the remote is not asked"
        );
        let status = l3.status();
        assert!(!status.healthy);
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("switched off"))
        );
        assert!(events.try_recv().is_err(), "one warning");

        setup.remote.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(l3.lookup(&[1; 32]).await, None, "the probe: a real miss");
        assert!(matches!(
            events.try_recv(),
            Ok(RemoteEvent::Recovered { .. })
        ));
        assert!(l3.status().healthy);
    }

    #[tokio::test]
    async fn a_hanging_remote_costs_a_timeout_not_a_stuck_build() {
        let setup = Setup::new();
        let l3 = setup.l3(RemoteMode::ReadWrite, None);
        setup.remote.hang.store(true, Ordering::Relaxed);
        let started = std::time::Instant::now();
        assert_eq!(l3.lookup(&[1; 32]).await, None);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(l3.status().errors >= 1);
    }

    #[tokio::test]
    async fn read_only_uploads_nothing_and_a_bad_local_copy_uploads_no_entry() {
        let setup = Setup::new();
        let read_only = setup.l3(RemoteMode::ReadOnly, None);
        read_only.store(&[1; 32], &setup.result(2));
        uploaded(&read_only).await;
        assert_eq!(setup.remote.requests.load(Ordering::Relaxed), 0);

        let l3 = setup.l3(RemoteMode::ReadWrite, None);
        let mut result = setup.result(2);
        result.layers[1].size += 1;
        l3.store(&[2; 32], &result);
        uploaded(&l3).await;
        assert!(
            setup.remote.actions().is_empty(),
            "no entry without its blobs"
        );
        assert_eq!(l3.status().uploads_failed, 1);
    }

    #[tokio::test]
    async fn flush_reports_uploads_it_could_not_finish() {
        let setup = Setup::new();
        let l3 = setup.l3(RemoteMode::ReadWrite, None);
        setup.remote.hang.store(true, Ordering::Relaxed);
        l3.store(&[1; 32], &setup.result(1));
        let report = l3.flush(Duration::from_millis(100)).await;
        assert_eq!(report.dropped_entries, 1);
        assert_eq!(l3.status().uploads_dropped, 1);
    }
}
