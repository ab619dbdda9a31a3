#![doc = include_str!("../README.md")]

mod bus;
pub mod codec;
mod config;
mod connection;
mod consumer;
mod error;
pub mod relay;
pub mod topology;

pub use bus::RabbitBus;
pub use config::{RabbitConfig, DEFAULT_AMQP_URL};
pub use error::RabbitError;
/// The W3C trace context, from es-core (where events carry it).
pub use es_core::TraceParent;
#[cfg(feature = "postgres")]
pub use relay::postgres::PgLeaderLock;
pub use relay::{LeaderLock, Leadership, LocalLeaderLock, RabbitRelay};
pub use topology::Topology;
