//! What the cache stores things under: a [`Key`] (action cache or CAS, and a SHA-256), and
//! the parsing of every form a client names one in — REAPI `Digest` messages, ByteStream
//! resource names and Bazel HTTP cache paths.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use sha2::{Digest as _, Sha256};

/// The two namespaces of a cache: content-addressed blobs, and action results stored under
/// the digest of the action that produced them (their content is not their name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Cas,
    Ac,
}

impl Kind {
    /// The directory (and the HTTP path segment) holding this kind.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Cas => "cas",
            Self::Ac => "ac",
        }
    }

    pub(crate) fn code(self) -> i64 {
        match self {
            Self::Cas => 0,
            Self::Ac => 1,
        }
    }

    pub(crate) fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Self::Cas),
            1 => Some(Self::Ac),
            _ => None,
        }
    }
}

/// A SHA-256 hash, kept as bytes (half the memory of hex in the index's map).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash of no bytes: the empty blob, which every CAS holds without storing it.
    pub const EMPTY: Self = Self([
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9,
        0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52,
        0xb8, 0x55,
    ]);

    /// Parses 64 lowercase hex characters (REAPI and Bazel's HTTP cache use lowercase).
    pub fn parse_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// An entry's name in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub hash: Hash,
}

impl Key {
    pub fn cas(hash: Hash) -> Self {
        Self {
            kind: Kind::Cas,
            hash,
        }
    }

    pub fn ac(hash: Hash) -> Self {
        Self {
            kind: Kind::Ac,
            hash,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.dir(), self.hash)
    }
}

/// A REAPI digest: a hash and the size of what it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    pub hash: Hash,
    pub size: u64,
}

/// Why a client's name for a blob was refused (an `INVALID_ARGUMENT`, or HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("no digest given")]
    Missing,
    #[error("{0:?} is not a SHA-256 hash (64 lowercase hex characters; only SHA-256 is served)")]
    BadHash(String),
    #[error("negative size {0}")]
    NegativeSize(i64),
    #[error("digest function {0} is not served: only SHA-256 is")]
    Function(i32),
    #[error("resource name {0:?} is not `[instance/]blobs/HASH/SIZE`")]
    BadResource(String),
    #[error("resource name {0:?} is not `[instance/]uploads/UUID/blobs/HASH/SIZE[/…]`")]
    BadUploadResource(String),
    #[error("compressed blobs are not served ({0:?})")]
    Compressed(String),
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            hash: Hash::of(bytes),
            size: bytes.len() as u64,
        }
    }

    pub fn from_proto(digest: Option<&reapi::Digest>) -> Result<Self, DigestError> {
        let digest = digest.ok_or(DigestError::Missing)?;
        Self::from_parts(&digest.hash, digest.size_bytes)
    }

    fn from_parts(hash: &str, size: i64) -> Result<Self, DigestError> {
        let hash = Hash::parse_hex(hash).ok_or_else(|| DigestError::BadHash(hash.to_owned()))?;
        let size = u64::try_from(size).map_err(|_| DigestError::NegativeSize(size))?;
        Ok(Self { hash, size })
    }

    pub fn to_proto(self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash.hex(),
            size_bytes: i64::try_from(self.size).unwrap_or(i64::MAX),
        }
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.hash == Hash::EMPTY
    }

    /// A ByteStream read resource: `[instance/]blobs/HASH/SIZE`.
    pub fn from_read_resource(name: &str) -> Result<Self, DigestError> {
        let bad = || DigestError::BadResource(name.to_owned());
        let parts: Vec<&str> = name.split('/').collect();
        let at = parts
            .iter()
            .position(|p| *p == "blobs" || *p == "compressed-blobs")
            .ok_or_else(bad)?;
        if parts[at] == "compressed-blobs" {
            return Err(DigestError::Compressed(name.to_owned()));
        }
        match &parts[at + 1..] {
            [hash, size] => Self::from_parts(hash, size.parse().map_err(|_| bad())?),
            _ => Err(bad()),
        }
    }

    /// A ByteStream write resource: `[instance/]uploads/UUID/blobs/HASH/SIZE[/metadata…]`.
    pub fn from_write_resource(name: &str) -> Result<Self, DigestError> {
        let bad = || DigestError::BadUploadResource(name.to_owned());
        let parts: Vec<&str> = name.split('/').collect();
        let at = parts.iter().position(|p| *p == "uploads").ok_or_else(bad)?;
        match &parts[at + 1..] {
            [_uuid, "blobs", hash, size, ..] => {
                Self::from_parts(hash, size.parse().map_err(|_| bad())?)
            }
            [_uuid, "compressed-blobs", ..] => Err(DigestError::Compressed(name.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash, self.size)
    }
}

/// Refuses a request for any digest function but SHA-256 (`UNKNOWN` = 0 means SHA-256).
pub fn check_function(function: i32) -> Result<(), DigestError> {
    let sha256 = reapi::digest_function::Value::Sha256 as i32;
    if function == 0 || function == sha256 {
        Ok(())
    } else {
        Err(DigestError::Function(function))
    }
}

/// A Bazel HTTP cache path, `[prefix/]ac/HASH` or `[prefix/]cas/HASH`.
pub fn from_http_path(path: &str) -> Option<Key> {
    let (rest, hex) = path.rsplit_once('/')?;
    let kind_dir = rest.rsplit('/').next()?;
    let hash = Hash::parse_hex(hex)?;
    match kind_dir {
        "cas" => Some(Key::cas(hash)),
        "ac" => Some(Key::ac(hash)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_hash_is_sha256_of_nothing() {
        assert_eq!(Hash::of(b""), Hash::EMPTY);
        assert_eq!(Hash::EMPTY.hex(), HEX);
        assert!(Digest::of(b"").is_empty_blob());
    }

    #[test]
    fn resource_names_with_and_without_instance() {
        let d = Digest::from_read_resource(&format!("blobs/{HEX}/0")).expect("plain");
        assert_eq!(d.hash, Hash::EMPTY);
        let d = Digest::from_read_resource(&format!("main/ci/blobs/{HEX}/12")).expect("instance");
        assert_eq!(d.size, 12);
        let d = Digest::from_write_resource(&format!("inst/uploads/3f2a/blobs/{HEX}/5/meta"))
            .expect("write");
        assert_eq!(d.size, 5);
        for bad in [
            format!("blobs/{HEX}"),
            format!("blobs/{HEX}/x"),
            format!("blobs/{}/1", HEX.to_uppercase()),
            format!("blobs/{HEX}/-1"),
            "nothing".to_owned(),
        ] {
            assert!(Digest::from_read_resource(&bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Digest::from_read_resource(&format!("compressed-blobs/zstd/{HEX}/1")),
            Err(DigestError::Compressed(_))
        ));
        assert!(Digest::from_write_resource(&format!("blobs/{HEX}/1")).is_err());
    }

    #[test]
    fn http_paths_name_ac_or_cas_under_any_prefix() {
        assert_eq!(
            from_http_path(&format!("/cas/{HEX}")),
            Some(Key::cas(Hash::EMPTY))
        );
        assert_eq!(
            from_http_path(&format!("/team/x/ac/{HEX}")),
            Some(Key::ac(Hash::EMPTY))
        );
        assert_eq!(from_http_path(&format!("/blob/{HEX}")), None);
        assert_eq!(from_http_path("/cas/abc"), None);
    }

    #[test]
    fn only_sha256_is_served() {
        assert!(check_function(0).is_ok());
        assert!(check_function(reapi::digest_function::Value::Sha256 as i32).is_ok());
        assert!(check_function(reapi::digest_function::Value::Blake3 as i32).is_err());
    }
}
