#![doc = include_str!("../README.md")]

mod core;
mod dead_letter;
mod error;
mod handle;
mod memory;
mod options;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod telemetry;

pub use dead_letter::DeadLetter;
pub use error::{Error, Result};
pub use handle::{ProjectionHandle, RunState};
pub use memory::{spawn_in_memory, spawn_in_memory_with};
pub use options::{OnError, RunnerOptions};
pub use telemetry::Lag;
