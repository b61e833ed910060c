//! `/metrics`: the server's counters in the Prometheus text format (prometheus-client's
//! OpenMetrics encoder). The main type is [`Metrics`]; handlers record into it, and a scrape
//! reads the store's sizes and eviction counters at that moment.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `memobuild_cache_requests_total` | `kind`, `status` | requests by RPC or HTTP route and outcome (gRPC code name or HTTP status) |
//! | `memobuild_cache_request_duration_seconds` | `kind` | latency histogram, from request to response headers |
//! | `memobuild_cache_hits_total`, `memobuild_cache_misses_total` | `kind` (`cas`, `ac`) | look-ups that found / did not find an entry |
//! | `memobuild_cache_received_bytes_total`, `memobuild_cache_sent_bytes_total` | | blob and action-result bytes in and out |
//! | `memobuild_cache_evictions_total`, `memobuild_cache_evicted_bytes_total` | | LRU evictions |
//! | `memobuild_cache_store_bytes`, `memobuild_cache_store_entries` | (`kind` for entries) | what is stored now |
//! | `memobuild_cache_max_size_bytes` | | the byte budget |
//! | `memobuild_cache_webhook_deliveries_total` | `result` (`delivered`, `failed`, `dropped`) | webhook outcomes |
//! | `memobuild_cache_builds_reported_total` | | build reports received |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::digest::Kind;
use super::store::Store;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// How a webhook delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    Failed,
    /// The queue was full: the summary was never sent.
    Dropped,
}

/// Every counter the server keeps (see the module doc).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<KindLabel, Histogram, fn() -> Histogram>,
    hits: Family<KindLabel, Counter>,
    misses: Family<KindLabel, Counter>,
    received: Counter,
    sent: Counter,
    evictions: Counter,
    evicted_bytes: Counter,
    store_bytes: Gauge,
    store_entries: Family<KindLabel, Gauge>,
    max_size: Gauge,
    webhooks: Family<ResultLabel, Counter>,
    builds: Counter,
    /// What the eviction counters showed at the last scrape (they are the store's).
    seen_evictions: AtomicU64,
    seen_evicted_bytes: AtomicU64,
    // Totals for /status, without walking the families.
    total_requests: AtomicU64,
    total_hits: AtomicU64,
    total_misses: AtomicU64,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn kind_name(kind: Kind) -> &'static str {
    kind.dir()
}

/// Totals shown by `/status`.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("memobuild_cache");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let hits = Family::<KindLabel, Counter>::default();
        let misses = Family::<KindLabel, Counter>::default();
        let (received, sent, evictions, evicted_bytes, builds) = Default::default();
        let (store_bytes, max_size) = Default::default();
        let store_entries = Family::<KindLabel, Gauge>::default();
        let webhooks = Family::<ResultLabel, Counter>::default();
        registry.register("requests", "Requests by kind and outcome", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            latency.clone(),
        );
        registry.register("hits", "Look-ups that found an entry", hits.clone());
        registry.register("misses", "Look-ups that found no entry", misses.clone());
        registry.register(
            "received_bytes",
            "Entry bytes received",
            Counter::clone(&received),
        );
        registry.register("sent_bytes", "Entry bytes sent", Counter::clone(&sent));
        registry.register(
            "evictions",
            "Entries evicted (LRU)",
            Counter::clone(&evictions),
        );
        registry.register(
            "evicted_bytes",
            "Bytes evicted (LRU)",
            Counter::clone(&evicted_bytes),
        );
        registry.register("store_bytes", "Bytes stored", Gauge::clone(&store_bytes));
        registry.register("store_entries", "Entries stored", store_entries.clone());
        registry.register(
            "max_size_bytes",
            "The store's byte budget",
            Gauge::clone(&max_size),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by outcome",
            webhooks.clone(),
        );
        registry.register(
            "builds_reported",
            "Build reports received",
            Counter::clone(&builds),
        );
        Self {
            registry,
            requests,
            latency,
            hits,
            misses,
            received,
            sent,
            evictions,
            evicted_bytes,
            store_bytes,
            store_entries,
            max_size,
            webhooks,
            builds,
            seen_evictions: AtomicU64::new(0),
            seen_evicted_bytes: AtomicU64::new(0),
            total_requests: AtomicU64::new(0),
            total_hits: AtomicU64::new(0),
            total_misses: AtomicU64::new(0),
        }
    }

    /// One request of `kind` ended with `status` after `elapsed`.
    pub fn request(&self, kind: &'static str, status: &str, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                kind,
                status: status.to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&KindLabel { kind })
            .observe(elapsed.as_secs_f64());
        self.total_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lookups(&self, kind: Kind, hits: u64, misses: u64) {
        let label = KindLabel {
            kind: kind_name(kind),
        };
        if hits > 0 {
            self.hits.get_or_create(&label).inc_by(hits);
            self.total_hits.fetch_add(hits, Ordering::Relaxed);
        }
        if misses > 0 {
            self.misses.get_or_create(&label).inc_by(misses);
            self.total_misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    pub fn received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    pub fn sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    pub fn webhook(&self, delivery: Delivery) {
        let result = match delivery {
            Delivery::Delivered => "delivered",
            Delivery::Failed => "failed",
            Delivery::Dropped => "dropped",
        };
        self.webhooks.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn build_reported(&self) {
        self.builds.inc();
    }

    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.total_requests.load(Ordering::Relaxed),
            hits: self.total_hits.load(Ordering::Relaxed),
            misses: self.total_misses.load(Ordering::Relaxed),
            received_bytes: self.received.get(),
            sent_bytes: self.sent.get(),
        }
    }

    /// The text exposition, with the store's figures as of now.
    pub fn encode(&self, store: &Store) -> String {
        let stats = store.stats();
        self.store_bytes
            .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        self.max_size
            .set(i64::try_from(store.max_size()).unwrap_or(i64::MAX));
        for (kind, n) in [(Kind::Cas, stats.cas_entries), (Kind::Ac, stats.ac_entries)] {
            self.store_entries
                .get_or_create(&KindLabel {
                    kind: kind_name(kind),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // The store counts evictions; carry what happened since the last scrape over.
        let entries = store.evictions.entries.load(Ordering::Relaxed);
        let bytes = store.evictions.bytes.load(Ordering::Relaxed);
        let seen = self.seen_evictions.swap(entries, Ordering::Relaxed);
        self.evictions.inc_by(entries.saturating_sub(seen));
        let seen = self.seen_evicted_bytes.swap(bytes, Ordering::Relaxed);
        self.evicted_bytes.inc_by(bytes.saturating_sub(seen));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_requests_hits_and_store_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20).expect("store");
        let metrics = Metrics::new();
        metrics.request("find_missing_blobs", "OK", Duration::from_millis(2));
        metrics.lookups(Kind::Cas, 3, 1);
        metrics.received(10);
        let text = metrics.encode(&store);
        for line in [
            "memobuild_cache_requests_total{kind=\"find_missing_blobs\",status=\"OK\"} 1",
            "memobuild_cache_hits_total{kind=\"cas\"} 3",
            "memobuild_cache_misses_total{kind=\"cas\"} 1",
            "memobuild_cache_received_bytes_total 10",
            "memobuild_cache_max_size_bytes 1048576",
            "memobuild_cache_request_duration_seconds_count{kind=\"find_missing_blobs\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert_eq!(metrics.totals().requests, 1);
    }
}
