//! memobuildd: the MemoBuild engine as a library, and the daemon that serves it.

pub mod frontend;
pub mod plan;
