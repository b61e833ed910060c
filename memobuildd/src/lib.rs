//! memobuildd: the MemoBuild engine as a library, and the daemon that serves it.
//!
//! Data flows one way through one module per stage (see `ARCHITECTURE.md`):
//! `frontend` (Dockerfile → instructions) → `plan` (→ build graph) → … → `server` (the
//! socket). `config` resolves where everything lives; `passwd` reads user and group databases.

pub mod cache;
pub mod cacheserver;
pub mod caller;
pub mod config;
pub mod context;
pub mod engine;
pub mod exec;
pub mod export;
pub mod frontend;
pub mod image;
pub mod layout;
pub mod passwd;
pub mod plan;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod watch;

pub use config::Config;
pub use server::{ServerError, run};
