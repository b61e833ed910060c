//! The wire protocol between `memobuild` (client) and `memobuildd` (daemon).
//!
//! This crate is the only place that knows the wire format (see `STYLE.md` rule 3):
//! - [`frame`]: u32 length-prefixed frames carrying postcard-encoded messages, bounded in size;
//! - [`messages`]: the handshake, every request, response and build event;
//! - [`paths`]: where the socket and the daemon's state live, so client and daemon agree;
//! - [`units`]: sizes and durations as people write them (`10GB`, `24h`), read alike by both.
//!
//! A connection is: the client sends a [`Hello`], the daemon answers a [`HelloReply`]; then
//! the client sends one [`Request`] at a time and reads [`Response`] frames until a terminal one
//! ([`Response::is_terminal`]). Enum variants are only ever appended; any other change to a
//! message bumps [`PROTOCOL_VERSION`], and the handshake refuses a mismatch with both versions.

pub mod frame;
pub mod messages;
pub mod paths;
pub mod units;

pub use frame::{FrameError, MAX_FRAME_LEN, read_frame, read_frame_len, read_payload, write_frame};
pub use messages::*;

/// Bumped on every change to the wire shape of any message after the handshake.
pub const PROTOCOL_VERSION: u32 = 6;

/// First four bytes of the handshake payload, so a daemon can tell a stray connection
/// (or a much older/newer client) from a real one before trusting anything else.
pub const MAGIC: [u8; 4] = *b"MBLD";

/// The version of the crates built together (client, daemon and protocol share it).
pub const PACKAGE_VERSION: &str = env!("CARGO_PKG_VERSION");
