//! The exchanges and queues the bus declares, and their names.
//!
//! For a prefix `P`, a topic (bounded context) `T` and a consumer group `G`:
//!
//! | object | name | kind and arguments |
//! |---|---|---|
//! | topic exchange | `P` + `T` | durable `topic`; routing keys `T.<message_type>` |
//! | work queue | `P` + `G` | durable quorum queue; `x-delivery-limit` = `max_attempts`; dead-letters to the dead-letter exchange, at least once |
//! | retry queue | `P` + `G` + `.retry.<ms>ms` | durable quorum queue with `x-message-ttl` = the retry delay; expired messages dead-letter back to the work queue, at least once |
//! | dead-letter exchange | `P` + `es.dead-letter` | durable `direct` |
//! | dead-letter queue | `P` + `G` + `.dead-letter` | durable quorum queue bound to the dead-letter exchange with the work queue's name |
//!
//! With [`Topology::with_queue_expires`] every queue also carries `x-expires`:
//! the broker deletes it after it has gone unused (no consumer, no
//! redeclaration) that long. Meant for temporary groups and test runs; a
//! retry or dead-letter queue has no consumer, so the expiry must be longer
//! than the longest run.
//!
//! Every declaration is idempotent; redeclaring a queue with other arguments
//! (another `max_attempts`) is refused by the broker and reported as
//! [`Error::TopologyConflict`].

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use es_core::{BusError, Subscription};

use crate::Error;

/// The header naming the attempt a message copy starts at.
pub const ATTEMPT_HEADER: &str = "x-es-attempt";
/// The header with the reason a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-es-dead-letter-reason";
/// The header with the group that dead-lettered a message.
pub const DEAD_LETTER_GROUP_HEADER: &str = "x-es-dead-letter-group";

/// Names of the objects the bus declares, under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    queue_expires: Option<std::time::Duration>,
}

impl Topology {
    /// Names under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            queue_expires: None,
        }
    }

    /// Declares every queue with `x-expires`: the broker deletes a queue
    /// unused for `expires`.
    #[must_use]
    pub fn with_queue_expires(mut self, expires: Option<std::time::Duration>) -> Self {
        self.queue_expires = expires;
        self
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic exchange of a bounded context.
    pub fn exchange(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// A group's work queue.
    pub fn queue(&self, group: &str) -> String {
        format!("{}{group}", self.prefix)
    }

    /// A group's retry queue for a retry delay.
    pub fn retry_queue(&self, subscription: &Subscription) -> String {
        format!(
            "{}{}.retry.{}ms",
            self.prefix,
            subscription.group,
            subscription.retry_delay.as_millis()
        )
    }

    /// The dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}es.dead-letter", self.prefix)
    }

    /// A group's dead-letter queue.
    pub fn dead_letter_queue(&self, group: &str) -> String {
        format!("{}{group}.dead-letter", self.prefix)
    }

    /// The exchanges a subscription's bindings name: the first word of each
    /// binding pattern is its topic.
    pub fn bindings(&self, subscription: &Subscription) -> Result<Vec<(String, String)>, BusError> {
        validate(subscription)?;
        Ok(subscription
            .bindings
            .iter()
            .map(|binding| {
                let topic = binding.split('.').next().unwrap_or(binding);
                (self.exchange(topic), binding.clone())
            })
            .collect())
    }

    /// Declares a topic exchange.
    pub async fn declare_exchange(&self, channel: &Channel, topic: &str) -> Result<(), Error> {
        let name = self.exchange(topic);
        declare_exchange(channel, &name, ExchangeKind::Topic).await
    }

    /// Declares everything a subscription needs: its topic exchanges, work
    /// queue and bindings, retry queue, and the dead-letter exchange and queue.
    pub async fn declare(
        &self,
        channel: &Channel,
        subscription: &Subscription,
    ) -> Result<(), Error> {
        let bindings = self
            .bindings(subscription)
            .map_err(|e| Error::InvalidName {
                name: subscription.group.clone(),
                reason: match e {
                    BusError::InvalidSubscription { .. } => "the subscription is invalid",
                    _ => "unusable",
                },
            })?;
        let queue = self.queue(&subscription.group);
        let retry = self.retry_queue(subscription);
        let dlx = self.dead_letter_exchange();
        let dlq = self.dead_letter_queue(&subscription.group);
        for name in [&queue, &retry, &dlx, &dlq] {
            short(name)?;
        }

        declare_exchange(channel, &dlx, ExchangeKind::Direct).await?;
        declare_queue(channel, &dlq, self.quorum()).await?;
        bind(channel, &dlq, &dlx, &queue).await?;

        let mut work = self.quorum();
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(subscription.max_attempts)),
        );
        dead_letter_to(&mut work, &dlx, &queue);
        declare_queue(channel, &queue, work).await?;

        let mut delayed = self.quorum();
        let ttl = i64::try_from(subscription.retry_delay.as_millis()).unwrap_or(i64::MAX);
        delayed.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        dead_letter_to(&mut delayed, "", &queue);
        declare_queue(channel, &retry, delayed).await?;

        for (exchange, pattern) in &bindings {
            short(exchange)?;
            short(pattern)?;
            declare_exchange(channel, exchange, ExchangeKind::Topic).await?;
            bind(channel, &queue, exchange, pattern).await?;
        }
        Ok(())
    }

    /// The arguments every queue is declared with.
    fn quorum(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("quorum"));
        if let Some(expires) = self.queue_expires {
            let ms = i64::try_from(expires.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        args
    }
}

/// Checks a subscription: a group name, at least one binding, and a topic
/// (not a wildcard) as the first word of each binding.
pub(crate) fn validate(subscription: &Subscription) -> Result<(), BusError> {
    let invalid = |reason: String| BusError::InvalidSubscription {
        group: subscription.group.clone(),
        reason,
    };
    if subscription.group.is_empty() {
        return Err(invalid("the group name is empty".to_owned()));
    }
    if subscription.bindings.is_empty() {
        return Err(invalid("it has no bindings".to_owned()));
    }
    for binding in &subscription.bindings {
        let topic = binding.split('.').next().unwrap_or("");
        if topic.is_empty() || topic == "*" || topic == "#" {
            return Err(invalid(format!(
                "binding {binding:?} must start with a topic name (the exchange), not a wildcard"
            )));
        }
    }
    Ok(())
}

pub(crate) fn short(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::InvalidName {
        name: name.to_owned(),
        reason: "longer than 255 bytes",
    })
}

fn dead_letter_to(args: &mut FieldTable, exchange: &str, routing_key: &str) {
    args.insert("x-dead-letter-exchange".into(), string(exchange));
    args.insert("x-dead-letter-routing-key".into(), string(routing_key));
    // Quorum queues dead-letter at least once only with reject-publish overflow.
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
}

pub(crate) fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<(), Error> {
    channel
        .exchange_declare(
            short(name)?,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| conflict(name, source))
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), Error> {
    channel
        .queue_declare(
            short(name)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(drop)
        .map_err(|source| conflict(name, source))
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), Error> {
    channel
        .queue_bind(
            short(queue)?,
            short(exchange)?,
            short(key)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(Error::protocol)
}

fn conflict(name: &str, source: lapin::Error) -> Error {
    if Error::is_precondition_failed(&source) {
        Error::TopologyConflict {
            name: name.to_owned(),
            source,
        }
    } else {
        Error::protocol(source)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use es_core::Subscription;

    use super::{validate, Topology};

    #[test]
    fn names_and_bindings() {
        let t = Topology::new("t1.");
        let s = Subscription::new("billing", ["order.*", "payment.PaymentTaken"])
            .with_retry_delay(Duration::from_millis(1500));
        assert_eq!(t.queue("billing"), "t1.billing");
        assert_eq!(t.retry_queue(&s), "t1.billing.retry.1500ms");
        assert_eq!(t.dead_letter_queue("billing"), "t1.billing.dead-letter");
        assert_eq!(
            t.bindings(&s).unwrap(),
            vec![
                ("t1.order".to_owned(), "order.*".to_owned()),
                ("t1.payment".to_owned(), "payment.PaymentTaken".to_owned())
            ]
        );
    }

    #[test]
    fn wildcard_topics_are_refused() {
        assert!(validate(&Subscription::new("g", ["#"])).is_err());
        assert!(validate(&Subscription::new("g", ["*.Created"])).is_err());
        assert!(validate(&Subscription::new("", ["order.*"])).is_err());
        assert!(validate(&Subscription::new("g", Vec::<String>::new())).is_err());
        assert!(validate(&Subscription::new("g", ["order.#"])).is_ok());
    }
}
