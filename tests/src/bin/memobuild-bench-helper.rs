//! The Rust side of `bench/compare.sh` (MemoBuild vs BuildKit): the parts that already
//! exist as test-support code, reused rather than rewritten in shell.
//!
//! ```text
//! memobuild-bench-helper context DIR FILES TOTAL_MB   generate the deterministic workload
//!                                                     (tests/src/workload.rs); prints the
//!                                                     NUL-separated file list's path
//! memobuild-bench-helper fingerprint DIR              one cold fingerprint of DIR (empty
//!                                                     stat cache), as the daemon does it
//! memobuild-bench-helper registry                     a `docker-registry` on 127.0.0.1 with
//!                                                     busybox seeded as `busybox:latest`
//!                                                     (tests/src/registry.rs); prints
//!                                                     HOST:PORT, serves until stdin closes,
//!                                                     then stops it and removes its files
//! ```

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::ExitCode;

use memobuild_tests::registry::TestRegistry;
use memobuild_tests::workload;
use memobuildd::context::{IgnoreRules, StatCache, scan};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["context", dir, files, total_mb] => {
            let (Ok(files), Ok(total_mb)) = (files.parse::<usize>(), total_mb.parse::<u64>())
            else {
                return usage();
            };
            let list = workload::generate_context(Path::new(dir), files, total_mb << 20);
            println!("{}", list.display());
        }
        ["fingerprint", dir] => {
            let db = tempfile::tempdir().expect("tempdir");
            let mut cache = StatCache::open(&db.path().join("c.sqlite")).expect("stat cache");
            let (_, report) =
                scan(Path::new(dir), &IgnoreRules::default(), &mut cache).expect("scan");
            std::hint::black_box(report);
        }
        ["registry"] => {
            let registry = TestRegistry::start();
            registry.seed_busybox("busybox");
            println!("{}", registry.address());
            std::io::stdout().flush().expect("stdout");
            // Serve until the runner closes our stdin (or dies); the drop stops the registry.
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(registry);
        }
        _ => return usage(),
    }
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: memobuild-bench-helper context DIR FILES TOTAL_MB | fingerprint DIR | registry"
    );
    ExitCode::from(2)
}
