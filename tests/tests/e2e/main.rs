//! End-to-end tests: one binary, a module per feature, each test on its own daemon.

mod access;
mod add;
mod build;
mod frontend;
mod gc;
mod images;
mod lifecycle;
mod protocol;
mod registry;
mod service_units;
mod watch;
