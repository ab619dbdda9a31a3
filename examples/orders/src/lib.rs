//! The reference order system.
