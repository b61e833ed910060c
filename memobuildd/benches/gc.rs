//! One GC pass over 10,000 action entries, each with its own layer blob and unpacked layer
//! directory, all unreferenced (`gc --all`): rows, files and directories removed.
//!
//! `cargo bench -p memobuildd --bench gc` (or `bash bench/gc.sh`) prints the pass's time for
//! each of a few runs and their median; the target is at most 1 s. `MEMOBUILD_GC_BENCH_ACTIONS`
//! changes the count. Building the store takes longer than collecting it: every blob is
//! fsynced on its way in, as builds do.

use std::time::{Duration, Instant};

use memobuildd::layout::Layout;
use memobuildd::store::{GcOptions, Store, StoreOptions};

const RUNS: usize = 3;

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
        memobuildd::testing::fill_store(&store, 0, actions, 1);
        let filled = filled.elapsed();
        let started = Instant::now();
        let report = store
            .gc(&GcOptions {
                keep_bytes: 0,
                keep_duration: None,
                all: true,
                cache_mounts_only: false,
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
