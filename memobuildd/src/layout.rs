//! Every path under the daemon's state root, in one place. Names carry a format version, so a
//! daemon never misreads data written in another format: it starts a fresh file beside it.
//!
//! ```text
//! <root>/
//!   memobuildd.lock          exclusive lock, holder's pid (server::listener)
//!   memobuildd.log           the daemon's log when the client started it
//!   context-v1.sqlite        stat cache and watched workspaces (context, watch)
//!   cas-v1/sha256/ab/…       blobs by digest: layers, configs, manifests (store)
//!   index-v1.sqlite          actions, tags, resolutions, base images, blob and layer rows (store)
//!   index-v1.sqlite.damaged  the last index found damaged, kept aside when it was rebuilt (store)
//!   layers-v1/<id>/          unpacked layers by diff-id, the lowerdirs of RUN mounts (store)
//!   cachemounts-v1/<id>/     RUN --mount=type=cache directories by id, with their use (store)
//!   tmp/                     blobs being written, step scratch, GC's trash; emptied at start
//!   run/                     mounts, bundles and upper dirs of running steps; emptied at start
//!   cookies/                 files a build writes to sync with the watcher (watch::Cookies)
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

    pub fn context_db(&self) -> PathBuf {
        self.root.join("context-v1.sqlite")
    }

    pub fn cas_dir(&self) -> PathBuf {
        self.root.join("cas-v1")
    }

    pub fn index_db(&self) -> PathBuf {
        self.root.join("index-v1.sqlite")
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers-v1")
    }

    pub fn cache_mounts_dir(&self) -> PathBuf {
        self.root.join("cachemounts-v1")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    pub fn cookies_dir(&self) -> PathBuf {
        self.root.join("cookies")
    }
}
