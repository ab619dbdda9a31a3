//! Notifications as real email, through an SMTP server (lettre).

use async_trait::async_trait;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::notification::{NotificationSink, SendError, SentNotification};
use crate::{Error, Result};

/// Sends each notification as one email. The subject names the order and the
/// kind: `Order <id>: <kind>`.
#[derive(Clone)]
pub(crate) struct SmtpSink {
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
    pub(crate) fn new(server: &str, from: &str) -> Result<Self> {
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
    async fn send(&self, notification: SentNotification) -> Result<(), SendError> {
        let not_sent = |reason: String| SendError::NotSent {
            reason,
            retry: false,
        };
        let to: Mailbox = notification
            .email
            .parse()
            .map_err(|e| not_sent(format!("address {:?}: {e}", notification.email)))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!(
                "Order {}: {}",
                notification.order_id,
                notification.kind.as_str()
            ))
            .body(notification.body.clone())
            .map_err(|e| not_sent(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map_err(|e| classify(&self.server, &e))?;
        tracing::info!(
            order_id = %notification.order_id,
            to = %notification.email,
            kind = notification.kind.as_str(),
            "email sent"
        );
        Ok(())
    }
}

/// What an SMTP failure says about whether the message was handed over: an
/// answer with a 4xx or 5xx code refused it, and a refused connection never
/// carried it; anything else (a timeout, a connection lost midway) may have
/// come after the server took it.
fn classify(server: &str, error: &lettre::transport::smtp::Error) -> SendError {
    let reason = format!("SMTP {server}: {error}");
    if error.is_transient() {
        return SendError::NotSent {
            reason,
            retry: true,
        };
    }
    if error.is_permanent() {
        return SendError::NotSent {
            reason,
            retry: false,
        };
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return SendError::NotSent {
                reason,
                retry: true,
            };
        }
        source = cause.source();
    }
    SendError::Unknown(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::NotificationKind;

    #[tokio::test]
    async fn a_refused_connection_is_certainly_not_sent_and_worth_retrying() {
        // A port nothing listens on any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sink = SmtpSink::new(&format!("127.0.0.1:{port}"), "shop@example.com").unwrap();
        let notification = SentNotification {
            order_id: uuid::Uuid::now_v7(),
            email: "ada@example.com".into(),
            kind: NotificationKind::OrderConfirmed,
            body: "Your order is confirmed.".into(),
        };
        let error = sink.send(notification).await.unwrap_err();
        assert!(
            matches!(error, SendError::NotSent { retry: true, .. }),
            "{error:?}"
        );
    }
}
