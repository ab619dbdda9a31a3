//! Event sourcing and CQRS for Rust.
//!
//! This umbrella crate re-exports [`es_core`] and, behind features, the
//! production backends: `postgres` (`es_postgres`, as `es::postgres`), `rabbit`
//! (`es_rabbit`, as `es::rabbit`) and `projections` (`es_projections`, as
//! `es::projections`). The `testing` feature brings es-core's test kit in as
//! `es::testing` (fixtures and the conformance suites), for dev-dependencies.
//! The `otel` feature makes the framework's spans continue, in
//! OpenTelemetry, the W3C trace their events and messages carry (`es::otel`);
//! the application installs the `tracing-opentelemetry` layer and exporter.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use es_core::*;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use es_postgres as postgres;
#[cfg(feature = "projections")]
#[cfg_attr(docsrs, doc(cfg(feature = "projections")))]
pub use es_projections as projections;
#[cfg(feature = "rabbit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbit")))]
pub use es_rabbit as rabbit;
