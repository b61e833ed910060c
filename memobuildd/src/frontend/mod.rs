//! Dockerfile frontend (to be written).
