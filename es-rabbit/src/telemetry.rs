//! Metric names.
//!
//! The bus and its consumers count through the [`metrics`] facade; install
//! any recorder (Prometheus exporter, statsd, ...) to collect them. Nothing
//! is recorded without one.
//!
//! Publishes carry an `exchange` label (the exchange's full name, with the
//! configured prefix; `amq.default` for messages published straight to a
//! queue); everything a consumer counts carries a `group` label.

/// Counter: messages the broker confirmed (`basic.ack` of a publisher
/// confirm) for [`EventBus::publish`](es_core::EventBus::publish),
/// [`RabbitBus::publish_to_group`](crate::RabbitBus::publish_to_group) and the
/// relay. A message nacked or returned as unroutable is not counted; the
/// copies a consumer republishes for a retry or a dead letter are counted by
/// [`RETRIED`] and [`DEAD_LETTERED`] instead. Label `exchange`.
pub const PUBLISHED: &str = "es_rabbit_published_total";
/// Counter: deliveries handed to a group's handler (one per attempt; a
/// message that cannot be decoded, or has used up its attempts, is
/// dead-lettered without reaching the handler and is not counted). Label
/// `group`.
pub const DELIVERED: &str = "es_rabbit_delivered_total";
/// Counter: deliveries acknowledged to the broker: handled, or settled by
/// moving a confirmed copy to the retry queue or the dead letters. Label
/// `group`.
pub const ACKED: &str = "es_rabbit_acked_total";
/// Counter: `basic.ack` frames sent by a group's consumers; each acks every
/// handled delivery up to the first still in hand (`multiple`), so under
/// load one frame acks many of [`ACKED`]. Label `group`.
pub const ACKS_SENT: &str = "es_rabbit_acks_sent_total";
/// Counter: deliveries whose copy for a later attempt the retry queue
/// confirmed. Label `group`.
pub const RETRIED: &str = "es_rabbit_retried_total";
/// Counter: deliveries whose copy the dead-letter queue confirmed
/// (undecodable, out of attempts, or refused by the handler). Label `group`.
pub const DEAD_LETTERED: &str = "es_rabbit_dead_lettered_total";

/// The `exchange` label of messages published to a queue through the
/// default exchange (the broker's own name for it).
pub(crate) const DEFAULT_EXCHANGE: &str = "amq.default";
