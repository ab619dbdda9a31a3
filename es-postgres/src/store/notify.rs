//! Waking subscribers: at once in this process, through `LISTEN`/`NOTIFY`
//! across processes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::Notify;

use super::{PgEventStore, Shared};

/// The shortest time between two `NOTIFY`s of one store under load.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

impl PgEventStore {
    /// Wakes this process's subscribers now (for example after committing a
    /// transaction that used [`PgEventStore::append_in_tx`]).
    pub fn wake_subscribers(&self) {
        self.shared.wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn announce(&self) {
        self.wake_subscribers();
        if !self.shared.settings.notify {
            return;
        }
        if !self.shared.notifier_started.swap(true, Ordering::AcqRel) {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(notifier(
                    Arc::downgrade(&self.shared),
                    self.shared.notify_signal.clone(),
                    self.shared.pool.clone(),
                    self.shared.channel.clone(),
                    self.shared.notify_payload.clone(),
                ));
            } else {
                self.shared.notifier_started.store(false, Ordering::Release);
                return;
            }
        }
        self.shared.notify_signal.notify_one();
    }

    pub(super) fn ensure_listener(&self) {
        if self.shared.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let options = (*self.shared.pool.connect_options()).clone();
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with(options);
                handle.spawn(listener(
                    Arc::downgrade(&self.shared),
                    pool,
                    self.shared.channel.clone(),
                    self.shared.notify_payload.clone(),
                    self.shared.settings.poll,
                ));
            }
            Err(_) => self.shared.listener_started.store(false, Ordering::Release),
        }
    }
}

/// The `NOTIFY` channel of a schema.
pub(super) fn notify_channel(schema: &str) -> String {
    let mut channel = format!("es_events_{schema}");
    // At most 63 bytes (PostgreSQL's identifier length), cut on a character
    // boundary: a name not checked by `validate_schema` may hold any text.
    let mut end = channel.len().min(63);
    while !channel.is_char_boundary(end) {
        end -= 1;
    }
    channel.truncate(end);
    channel
}

/// Sends one `NOTIFY` per burst of appends, outside the appends' own
/// transactions (a `NOTIFY` inside them would serialize every commit on the
/// server's notification lock). Its payload names this store instance, whose
/// own subscribers were woken in process already: its listener passes over
/// it.
async fn notifier(
    shared: Weak<Shared>,
    signal: Arc<Notify>,
    pool: PgPool,
    channel: String,
    payload: String,
) {
    loop {
        tokio::select! {
            () = signal.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                if shared.strong_count() == 0 { return; }
                continue;
            }
        }
        if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&channel)
            .bind(&payload)
            .execute(&pool)
            .await
        {
            tracing::debug!(%error, channel, "NOTIFY failed; subscribers elsewhere fall back to polling");
        }
        // At most one NOTIFY per interval under load: appends meanwhile are
        // announced by the next one.
        tokio::time::sleep(NOTIFY_INTERVAL).await;
    }
}

fn bump(shared: &Weak<Shared>) -> bool {
    match shared.upgrade() {
        Some(shared) => {
            shared.wake.send_modify(|v| *v = v.wrapping_add(1));
            true
        }
        None => false,
    }
}

/// Listens on the schema's channel and bumps the wake-up signal for
/// notifications of other processes (and of `append_in_tx`), not for this
/// instance's own, whose subscribers were woken when it appended;
/// reconnects after a lost connection (and bumps, since a notification may
/// have been missed meanwhile).
async fn listener(
    shared: Weak<Shared>,
    pool: PgPool,
    channel: String,
    own: String,
    retry: Duration,
) {
    loop {
        if shared.strong_count() == 0 {
            return;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, channel, "LISTEN connection failed; polling meanwhile");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(&channel).await {
            tracing::warn!(%error, channel, "LISTEN failed; polling meanwhile");
            tokio::time::sleep(retry).await;
            continue;
        }
        if !bump(&shared) {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await {
                Err(_) => {
                    if shared.strong_count() == 0 {
                        return;
                    }
                }
                Ok(Ok(Some(first))) => {
                    let mut foreign = first.payload() != own;
                    while let Some(next) = listener.next_buffered() {
                        foreign |= next.payload() != own;
                    }
                    if foreign && !bump(&shared) {
                        return;
                    }
                }
                Ok(Ok(None)) => {
                    tracing::info!(channel, "LISTEN connection lost; reconnecting");
                    if !bump(&shared) {
                        return;
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, channel, "LISTEN connection failed; reconnecting");
                    if !bump(&shared) {
                        return;
                    }
                    tokio::time::sleep(retry.min(Duration::from_secs(1))).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::notify_channel;

    /// The channel is cut to PostgreSQL's 63 bytes on a character boundary,
    /// whatever the (unchecked) schema name holds.
    #[test]
    fn a_long_or_multibyte_schema_name_gives_a_channel_of_at_most_63_bytes() {
        assert_eq!(notify_channel("orders"), "es_events_orders");
        let long = notify_channel(&"a".repeat(100));
        assert_eq!(long.len(), 63);
        let wide = notify_channel(&"é".repeat(40));
        assert!(wide.len() <= 63 && wide.len() >= 61, "{}", wide.len());
        assert!(wide.starts_with("es_events_é"));
    }
}
