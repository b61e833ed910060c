//! The `Gc` and `CacheStats` requests, and the store's figures in `Status`: the store's
//! types turned into protocol messages.

use std::time::Duration;

use memobuild_protocol::{CacheStats, ErrorCode, GcRequest, GcSummary, Response};

use crate::engine::Engine;
use crate::store::{GcOptions, GcReport, blocking};

/// Runs a GC pass as asked, on a blocking thread; the configured policy fills what the
/// request leaves out.
pub(crate) async fn gc(engine: &Engine, request: GcRequest) -> Response {
    let store = engine.store().clone();
    let policy = store.policy();
    let options = GcOptions {
        keep_bytes: request.keep_bytes.unwrap_or(policy.keep_bytes),
        keep_duration: request
            .keep_duration_secs
            .map(Duration::from_secs)
            .or(policy.keep_duration),
        all: request.all,
        cache_mounts_only: request.cache_mounts_only,
        dry_run: request.dry_run,
        time_limit: None,
    };
    match blocking(move || store.gc(&options)).await {
        Ok(report) => Response::Gc(report_message(&report)),
        Err(err) => Response::error(ErrorCode::Internal, err.to_string()),
    }
}

fn report_message(report: &GcReport) -> memobuild_protocol::GcReport {
    memobuild_protocol::GcReport {
        removed_blobs: report.removed_blobs,
        freed_bytes: report.freed_bytes,
        kept_bytes: report.kept_bytes,
        removed_actions: report.removed_actions,
        removed_bases: report.removed_bases,
        removed_layers: report.removed_layers,
        dry_run: report.dry_run,
        complete: report.complete,
        removed_cache_mounts: report.removed_cache_mounts,
        duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
    }
}

/// L1 and the store, from counters kept in memory (no disk walk per request).
pub(crate) fn cache_stats(engine: &Engine) -> CacheStats {
    let usage = engine.cache_usage();
    let store = engine.store().stats();
    CacheStats {
        l1_entries: usage.l1_entries,
        l1_bytes: usage.l1_bytes,
        l2_blobs: store.blobs,
        l2_bytes: store.blob_bytes,
        l2_budget_bytes: store.keep_bytes,
        action_entries: store.actions,
        hits: usage.hits,
        misses: usage.misses,
        unpacked_layers: store.layers,
        unpacked_bytes: store.layer_bytes,
        index_bytes: store.index_bytes,
        other_bytes: store.other_bytes,
        tags: store.tags,
        leases: store.leases,
        total_bytes: store.total_bytes,
        keep_duration_secs: store.keep_duration.map(|d| d.as_secs()),
        last_gc: store.last_gc.map(|last| GcSummary {
            finished_unix: last.finished_unix,
            trigger: last.trigger.as_str().to_owned(),
            report: report_message(&last.report),
        }),
        gc_running: store.gc_running,
        cache_mounts: store.cache_mounts,
        cache_mount_bytes: store.cache_mount_bytes,
    }
}
