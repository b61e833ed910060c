//! Build results by key, in tiers: L1 in memory, L2 on disk (content-addressed blobs in
//! [`cas`] plus the SQLite action cache), L3 a shared remote cache.

pub mod cas;

pub use cas::{Blob, BlobWriter, Cas, CasError, Digest};
