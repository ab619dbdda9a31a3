//! Notifications as real email, through an SMTP server (lettre).

use async_trait::async_trait;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::notification::{NotificationSink, SentNotification};
use crate::{Error, Result};

/// Sends each notification as one email. The subject names the order and the
/// kind: `Order <id>: <kind>`.
#[derive(Clone)]
pub struct SmtpSink {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    server: String,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SmtpSink {
    /// A sink sending through `server` (`host:port`, plain SMTP: meant for a
    /// relay on loopback or in the same network) from `from`.
    ///
    /// # Errors
    /// When the address or the sender is malformed.
    pub fn new(server: &str, from: &str) -> Result<Self> {
        let (host, port) = server
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| Error::validation("smtp", format!("{server:?} is not host:port")))?;
        let from: Mailbox = from
            .parse()
            .map_err(|e| Error::validation("mail_from", format!("{from:?}: {e}")))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(std::time::Duration::from_secs(10)))
            .build();
        Ok(Self {
            transport,
            from,
            server: server.to_owned(),
        })
    }
}

#[async_trait]
impl NotificationSink for SmtpSink {
    async fn send(&self, notification: SentNotification) -> Result<(), Error> {
        let to: Mailbox = notification
            .email
            .parse()
            .map_err(|e| Error::validation("email", format!("{:?}: {e}", notification.email)))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!(
                "Order {}: {}",
                notification.order_id,
                notification.kind.as_str()
            ))
            .body(notification.body.clone())
            .map_err(Error::internal)?;
        self.transport
            .send(message)
            .await
            .map_err(|e| Error::internal(format!("SMTP {}: {e}", self.server)))?;
        tracing::info!(
            order_id = %notification.order_id,
            to = %notification.email,
            kind = notification.kind.as_str(),
            "email sent"
        );
        Ok(())
    }
}
