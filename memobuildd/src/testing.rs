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
