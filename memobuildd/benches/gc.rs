//! One GC pass over 10,000 action entries, each with its own layer blob and unpacked layer
//! directory, all unreferenced (`gc --all`): rows, files and directories removed.
//!
//! `cargo bench -p memobuildd --bench gc` (or `bash bench/gc.sh`) prints the pass's time for
//! each of a few runs and their median; the target is at most 1 s. `MEMOBUILD_GC_BENCH_ACTIONS`
//! changes the count. Building the store takes longer than collecting it: every blob is
//! fsynced on its way in, as builds do.

use std::time::{Duration, Instant};

use memobuildd::layout::Layout;
use memobuildd::store::{ActionResult, Digest, GcOptions, LayerRecord, Store, StoreOptions};

const RUNS: usize = 3;

fn populate(store: &Store, actions: u64) {
    let lease = store.lease();
    for i in 0..actions {
        let bytes = format!("layer {i} {}", "x".repeat(200)).into_bytes();
        let blob = lease.cas().put(&bytes).expect("blob");
        let dir = store.scratch("bench-").expect("scratch");
        std::fs::write(dir.join("file"), &bytes).expect("file");
        let diff_id = Digest::of(&i.to_le_bytes());
        lease.adopt(&diff_id, &dir).expect("adopt");
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&i.to_le_bytes());
        let result = ActionResult {
            layers: vec![LayerRecord {
                blob,
                diff_id,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            }],
        };
        lease.record_action(&key, &result).expect("record");
    }
}

fn main() {
    let actions: u64 = std::env::var("MEMOBUILD_GC_BENCH_ACTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let mut times = Vec::new();
    for run in 0..RUNS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&Layout::new(dir.path()), StoreOptions::default()).expect("store");
        let filled = Instant::now();
        populate(&store, actions);
        let filled = filled.elapsed();
        let started = Instant::now();
        let report = store
            .gc(&GcOptions {
                keep_bytes: 0,
                keep_duration: None,
                all: true,
                dry_run: false,
                time_limit: None,
            })
            .expect("gc");
        let took = started.elapsed();
        assert_eq!(report.removed_actions, actions, "{report:?}");
        assert_eq!(report.removed_blobs, actions, "{report:?}");
        assert_eq!(report.removed_layers, actions, "{report:?}");
        println!(
            "run {run}: gc of {actions} actions in {took:?} (freed {} bytes; store built in {filled:?})",
            report.freed_bytes
        );
        times.push(took);
    }
    times.sort();
    let median: Duration = times[RUNS / 2];
    println!("median: {median:?} (target: at most 1 s; the unlinking goes on in the trash thread)");
}
