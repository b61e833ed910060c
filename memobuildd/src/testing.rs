//! Helpers shared by the unit tests here and the end-to-end tests in `tests/`.

/// Set in CI: a test that cannot get the privileges it needs fails instead of skipping.
pub const REQUIRE_PRIVILEGED_ENV: &str = "MEMOBUILD_REQUIRE_PRIVILEGED";

/// Whether a test needing root (mounts, runc, mknod) can run. Without root it is skipped with
/// a message, unless [`REQUIRE_PRIVILEGED_ENV`] is set (as in CI): then it fails.
pub fn privileged(test: &str) -> bool {
    if crate::passwd::effective_uid() == 0 {
        return true;
    }
    assert!(
        std::env::var_os(REQUIRE_PRIVILEGED_ENV).is_none(),
        "{test} needs root and {REQUIRE_PRIVILEGED_ENV} is set: refusing to skip"
    );
    eprintln!(
        "SKIPPED {test}: needs root (run as root, or set {REQUIRE_PRIVILEGED_ENV}=1 to make this a failure)"
    );
    false
}

/// Fills `store` with `count` actions as builds leave them: each its own layer blob and
/// unpacked layer directory of `files` files, keyed by `first..first + count`. For GC's
/// benchmark and the kill-during-GC test.
pub fn fill_store(store: &crate::store::Store, first: u64, count: u64, files: usize) {
    use crate::store::{ActionResult, Digest, LayerRecord};
    let lease = store.lease();
    for n in first..first + count {
        let bytes = format!("layer {n} {}", "x".repeat(2000)).into_bytes();
        let blob = lease.cas().put(&bytes).expect("blob");
        let dir = store.scratch("fill-").expect("scratch");
        for f in 0..files {
            std::fs::write(dir.join(format!("f{f}")), &bytes[f * 8..]).expect("file");
        }
        let diff_id = Digest::of(&n.to_le_bytes());
        lease.adopt(&diff_id, &dir).expect("adopt");
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&n.to_le_bytes());
        let result = ActionResult {
            layers: vec![LayerRecord {
                blob,
                diff_id,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                content_id: *blake3::hash(&n.to_le_bytes()).as_bytes(),
            }],
        };
        lease.record_action(&key, &result).expect("record");
    }
}
