#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(all(feature = "cli", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "cli", feature = "postgres"))))]
pub mod cli;
#[cfg(feature = "postgres")]
#[doc(hidden)]
pub mod doc_support;
mod error;
mod handle;
mod memory;
mod options;
mod parked;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
mod redis_sink;
mod runner;
pub mod telemetry;

pub use error::{Error, Result};
pub use handle::{ProjectionHandle, RunState};
pub use memory::{spawn_in_memory, spawn_in_memory_with};
pub use options::{OnError, RunnerOptions};
pub use parked::ParkedEvent;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_sink::{RedisSink, Versioned};
pub use telemetry::Lag;
