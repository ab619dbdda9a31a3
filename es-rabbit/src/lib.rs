#![doc = include_str!("../README.md")]

mod bus;
pub mod codec;
mod config;
mod connection;
mod consumer;
mod error;
pub mod relay;
pub mod topology;
mod trace;

pub use bus::{DeadLetter, RabbitBus};
pub use config::{RabbitConfig, DEFAULT_AMQP_URL};
pub use error::RabbitError;
#[cfg(feature = "postgres")]
pub use relay::postgres::PgLeaderLock;
pub use relay::{LeaderLock, Leadership, LocalLeaderLock, RabbitRelay};
pub use topology::Topology;
pub use trace::TraceParent;
