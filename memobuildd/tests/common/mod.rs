//! BuildKit's parser and expansion test data for the integration tests: where it is, and
//! what a bare clone without it does (says so loudly; fails only in CI).

use std::path::{Path, PathBuf};

const DIR_ENV: &str = "MEMOBUILD_CONFORMANCE_DIR";

/// Where the data is, or `None` (after saying so) when this is a bare clone outside CI.
pub(crate) fn data_root(test: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.is_dir(),
            "{DIR_ENV}={} is not a directory",
            dir.display()
        );
        return Some(dir);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance");
    if beside.is_dir() {
        return Some(beside);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci,
        "{test}: BuildKit's conformance data is missing ({} does not exist and {DIR_ENV} is \
         not set), and CI=true makes that a failure",
        beside.display()
    );
    eprintln!(
        "\n!!! {test}: NOT RUN — BuildKit's parser/expansion data is not here: set {DIR_ENV} \
         or put it at {} (passing only because CI is not set) !!!\n",
        beside.display()
    );
    None
}
