//! Cold context fingerprint vs `b3sum` over the same files, side by side.
//!
//! `cargo bench -p memobuildd --bench context -- [DIR] [FILES] [TOTAL_MB]`
//! Generates DIR (default /tmp/memobuild-bench-ctx) with FILES files (default 50,000) totalling
//! about TOTAL_MB (default 1000) from a fixed seed unless it already holds them, then reports
//! the median of 5 runs of: a cold scan (empty stat cache), a warm scan (stat cache full, every
//! file vouched for), and `b3sum` over every file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use memobuildd::context::{IgnoreRules, StatCache, scan};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = PathBuf::from(
        args.first()
            .map_or("/tmp/memobuild-bench-ctx", String::as_str),
    );
    let files: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let total_mb: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let list = generate(&dir, files, total_mb << 20);
    let rules = IgnoreRules::default();

    let cold = median(5, || {
        let db = tempfile::tempdir().expect("tempdir");
        let mut cache = StatCache::open(&db.path().join("c.sqlite")).expect("cache");
        let started = Instant::now();
        let (tree, report) = scan(&dir, &rules, &mut cache).expect("scan");
        assert_eq!(report.files as usize, files);
        std::hint::black_box(tree.root_hash());
        started.elapsed()
    });
    let db = tempfile::tempdir().expect("tempdir");
    let mut cache = StatCache::open(&db.path().join("c.sqlite")).expect("cache");
    scan(&dir, &rules, &mut cache).expect("prime");
    std::thread::sleep(Duration::from_millis(100));
    scan(&dir, &rules, &mut cache).expect("prime");
    let warm = median(5, || {
        let started = Instant::now();
        let (_, report) = scan(&dir, &rules, &mut cache).expect("scan");
        assert_eq!(report.hashed_files, 0);
        started.elapsed()
    });
    let b3sum = median(5, || {
        let started = Instant::now();
        let status = Command::new("xargs")
            .args(["-0", "-n", "5000", "b3sum", "--no-names"])
            .stdin(std::fs::File::open(&list).expect("list"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("b3sum (apt-get install b3sum)");
        assert!(status.success());
        started.elapsed()
    });
    println!("context fingerprint, {files} files, ~{total_mb} MB, median of 5:");
    println!("  memobuild cold scan   {:>8.1} ms", ms(cold));
    println!("  b3sum                 {:>8.1} ms", ms(b3sum));
    println!("  ratio cold/b3sum      {:>8.2}", ms(cold) / ms(b3sum));
    println!(
        "  memobuild warm scan   {:>8.1} ms (stat cache vouches for every file)",
        ms(warm)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    f(); // warm-up
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[runs / 2]
}

/// Writes the workload once (deterministic), and a NUL-separated file list for b3sum.
fn generate(dir: &Path, files: usize, total: u64) -> PathBuf {
    let list = dir.with_extension("list");
    let marker = dir.with_extension("generated");
    let expected = format!("{files} {total}");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&expected) && list.exists() {
        return list;
    }
    let _ = std::fs::remove_dir_all(dir);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let average = total / files as u64;
    let mut names = Vec::with_capacity(files);
    let mut buf = Vec::new();
    for i in 0..files {
        let rel = format!("d{:02}/s{:03}/f{i}.dat", i % 50, (i / 50) % 100);
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        // Sizes spread from 0 to 2x the average, so some files are big and most are small.
        let size = (next() % (2 * average + 1)) as usize;
        buf.resize(size, 0);
        for chunk in buf.chunks_mut(8) {
            let word = next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        std::fs::write(&path, &buf).expect("write");
        names.push(path);
    }
    let mut listing = Vec::new();
    for name in names {
        listing.extend_from_slice(name.as_os_str().as_encoded_bytes());
        listing.push(0);
    }
    std::fs::write(&list, listing).expect("list");
    std::fs::write(&marker, expected).expect("marker");
    list
}
