//! End-to-end tests: one binary, a module per feature, each test on its own daemon.

mod access;
mod add;
mod build;
mod cacheserver;
mod clientflags;
mod compression;
mod conformance;
mod cutoff;
mod frontend;
mod gc;
mod hotstate;
mod images;
mod lifecycle;
mod mounts;
mod outputs;
mod prebuild;
mod protocol;
mod registry;
mod remote;
mod service_units;
mod shared_cache;
mod watch;
