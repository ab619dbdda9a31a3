#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acks;
mod bus;
pub mod codec;
mod config;
mod connection;
mod consumer;
mod error;
pub mod relay;
pub mod telemetry;
pub mod topology;

pub use bus::RabbitBus;
pub use config::{RabbitConfig, DEFAULT_AMQP_URL};
pub use error::{Error, Result};
/// The W3C trace context, from es-core (where events carry it).
pub use es_core::TraceParent;
pub use relay::RabbitRelay;
pub use topology::Topology;
