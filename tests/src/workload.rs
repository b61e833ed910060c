//! Generated workloads for benchmarks: deterministic (fixed seed), never downloaded.

use std::path::{Path, PathBuf};

/// A context of `files` files totalling about `total_bytes`, spread over 50 × 100
/// directories, sizes from 0 to twice the average. Written once: a marker beside `dir`
/// records what it holds. Returns a NUL-separated list of the files (for `xargs -0`).
pub fn generate_context(dir: &Path, files: usize, total_bytes: u64) -> PathBuf {
    let list = dir.with_extension("list");
    let marker = dir.with_extension("generated");
    let expected = format!("{files} {total_bytes}");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&expected) && list.exists() {
        return list;
    }
    let _ = std::fs::remove_dir_all(dir);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let average = total_bytes / files as u64;
    let mut listing = Vec::new();
    let mut buf = Vec::new();
    for i in 0..files {
        let path = dir.join(format!("d{:02}/s{:03}/f{i}.dat", i % 50, (i / 50) % 100));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        buf.resize((rng.next_u64() % (2 * average + 1)) as usize, 0);
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(&path, &buf).expect("write");
        listing.extend_from_slice(path.as_os_str().as_encoded_bytes());
        listing.push(0);
    }
    std::fs::write(&list, listing).expect("list");
    std::fs::write(&marker, expected).expect("marker");
    list
}

/// A tiny deterministic generator (xorshift64).
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
