//! The scheduler (being written).

pub mod copy;
pub mod user;
pub mod view;
