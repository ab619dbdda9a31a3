//! Connection and publishing settings.

use std::time::Duration;

/// The default broker address, used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How a [`RabbitBus`](crate::RabbitBus) connects, names its topology and
/// publishes. Its `Debug` shows the URL without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitConfig {
    /// The broker's AMQP URL.
    pub url: String,
    /// Prepended to every exchange and queue name the bus declares, so that
    /// several applications (or tests) share a broker without meeting.
    pub prefix: String,
    /// Whether a published message that reaches no queue is an error
    /// ([`BusError::Unroutable`](es_core::BusError::Unroutable)). The relay
    /// turns this off: events are published whether or not a group listens yet.
    pub mandatory: bool,
    /// How many publisher confirms may be outstanding at once in one publish
    /// call.
    pub confirm_window: usize,
    /// The first delay before reconnecting after the connection is lost.
    pub reconnect_min: Duration,
    /// The longest delay between reconnection attempts.
    pub reconnect_max: Duration,
    /// The connection's name, shown in the broker's management tools.
    pub connection_name: String,
    /// How long one broker operation (connect, declare, publish confirm, ack)
    /// may take before the connection is treated as broken.
    pub operation_timeout: Duration,
    /// When set, every queue is declared with `x-expires`: the broker deletes
    /// a queue that has gone unused this long (see
    /// [`Topology`](crate::Topology)). For temporary groups and test runs.
    pub queue_expires: Option<Duration>,
}

impl RabbitConfig {
    /// Settings for the broker at `url`, with no prefix, mandatory publishing,
    /// a confirm window of 256, reconnection backoff from 100 ms to 5 s and a
    /// 15 s limit per broker operation.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: String::new(),
            mandatory: true,
            confirm_window: 256,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connection_name: "es-rabbit".to_owned(),
            operation_timeout: Duration::from_secs(15),
            queue_expires: None,
        }
    }

    /// Settings for the broker named by the `AMQP_URL` environment variable,
    /// or [`DEFAULT_AMQP_URL`].
    pub fn from_env() -> Self {
        Self::new(std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned()))
    }

    /// Sets the name prefix of exchanges and queues.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets whether unroutable messages are errors.
    #[must_use]
    pub fn with_mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Sets the number of outstanding publisher confirms per publish call.
    #[must_use]
    pub fn with_confirm_window(mut self, window: usize) -> Self {
        self.confirm_window = window.max(1);
        self
    }

    /// Sets the reconnection backoff bounds.
    #[must_use]
    pub fn with_reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// Sets the time limit of one broker operation.
    #[must_use]
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets (or clears) the expiry of unused queues.
    #[must_use]
    pub fn with_queue_expires(mut self, expires: Option<Duration>) -> Self {
        self.queue_expires = expires;
        self
    }

    /// Sets the connection name.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self::from_env()
    }
}

impl std::fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &es_core::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("mandatory", &self.mandatory)
            .field("confirm_window", &self.confirm_window)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("connection_name", &self.connection_name)
            .field("operation_timeout", &self.operation_timeout)
            .field("queue_expires", &self.queue_expires)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_shows_no_password() {
        let shown = format!(
            "{:?}",
            super::RabbitConfig::new("amqp://app:s3cr3t@broker:5672/%2f")
        );
        assert!(shown.contains("amqp://app:***@broker:5672/%2f"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
