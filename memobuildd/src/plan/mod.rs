//! Build graph (to be written).
