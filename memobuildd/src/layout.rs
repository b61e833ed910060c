//! Every path under the daemon's state root, in one place. Names carry a format version, so a
//! daemon never misreads data written in another format: it starts a fresh file beside it.
//!
//! ```text
//! <root>/
//!   memobuildd.lock       exclusive lock, holder's pid (server::listener)
//!   memobuildd.log        the daemon's log when the client started it
//!   context-v1.sqlite     stat cache and watched workspaces (context, watch)
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("memobuildd.lock")
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join(memobuild_protocol::paths::LOG_FILE)
    }

    pub fn context_db(&self) -> PathBuf {
        self.root.join("context-v1.sqlite")
    }
}
