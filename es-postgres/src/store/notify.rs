//! Waking subscribers: at once in this process, through `LISTEN`/`NOTIFY`
//! across processes.
//!
//! A `NOTIFY` rides on an append: the first append statement of each
//! interval ([`NOTIFY_INTERVAL`]) carries one, in its own transaction, so a
//! store whose appends are sparse sends no transaction of its own for them.
//! Writes that commit without carrying one (the interval's `NOTIFY` was
//! taken, or a path that does not carry one) are counted as unannounced and
//! signal the notifier task, which waits for the interval to end (and a
//! grace longer while append statements keep starting, so that one of them
//! carries it) and sends a `NOTIFY` of its own only if no append carried one
//! that covers them meanwhile. Either way a store starts at most one `NOTIFY` per interval: a
//! `NOTIFY` in every append transaction would serialize every commit on the
//! server's notification lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{PgEventStore, Shared};

/// The shortest time between the starts of two `NOTIFY`s of one store.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// How much longer than the interval the notifier task waits while append
/// statements keep starting (one started within the last interval): one
/// that starts meanwhile carries the `NOTIFY` instead.
const NOTIFY_GRACE: Duration = Duration::from_micros(2_500);

/// How many `NOTIFY`s a store has sent, by how: see
/// [`PgEventStore::notify_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NotifyStats {
    /// `NOTIFY`s carried by an append statement, in its own transaction
    /// (counted when the statement committed).
    pub carried: u64,
    /// `NOTIFY`s the notifier task sent in a transaction of their own, for
    /// writes that committed without one.
    pub separate: u64,
}

/// The `NOTIFY` bookkeeping of one store, shared with its notifier task.
#[derive(Debug)]
pub(super) struct Notices {
    /// Wakes the notifier task.
    signal: Notify,
    notifier_started: AtomicBool,
    /// The time base of `last_started`.
    base: Instant,
    /// When the last `NOTIFY` was started: nanoseconds since `base`, plus
    /// one; 0 when none was.
    last_started: AtomicU64,
    /// When the last append statement that could carry a `NOTIFY` started,
    /// in the same unit.
    last_write: AtomicU64,
    /// Writes committed without carrying a `NOTIFY`, since the store began.
    unannounced: AtomicU64,
    /// The value of `unannounced` that the committed `NOTIFY`s cover: every
    /// write counted up to it committed before one of them started.
    covered: AtomicU64,
    carried: AtomicU64,
    separate: AtomicU64,
}

impl Notices {
    pub(super) fn new() -> Self {
        Self {
            signal: Notify::new(),
            notifier_started: AtomicBool::new(false),
            base: Instant::now(),
            last_started: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            unannounced: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            carried: AtomicU64::new(0),
            separate: AtomicU64::new(0),
        }
    }

    fn stamp(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// How long until the interval of the last `NOTIFY` started is over;
    /// `None` when it is.
    fn interval_left(&self, now: Instant) -> Option<Duration> {
        let last = self.last_started.load(Ordering::Acquire);
        if last == 0 {
            return None;
        }
        let since = Duration::from_nanos(self.stamp(now).saturating_sub(last));
        NOTIFY_INTERVAL.checked_sub(since).filter(|d| !d.is_zero())
    }

    /// How long the notifier task waits before sending a `NOTIFY` of its
    /// own: until the interval is over, and a grace longer while append
    /// statements keep starting; `None` when it need not wait.
    fn notifier_wait(&self, now: Instant) -> Option<Duration> {
        let left = self.interval_left(now);
        let last_write = self.last_write.load(Ordering::Acquire);
        let busy = last_write != 0
            && Duration::from_nanos(self.stamp(now).saturating_sub(last_write)) < NOTIFY_INTERVAL;
        if !busy {
            return left;
        }
        let last = self.last_started.load(Ordering::Acquire);
        let since = Duration::from_nanos(self.stamp(now).saturating_sub(last));
        (NOTIFY_INTERVAL + NOTIFY_GRACE)
            .checked_sub(since)
            .filter(|d| !d.is_zero())
    }

    /// Takes the current interval's `NOTIFY`: true (and the start recorded)
    /// when none was started within the last interval, false when one was.
    fn claim(&self, now: Instant) -> bool {
        let stamp = self.stamp(now);
        let mut last = self.last_started.load(Ordering::Acquire);
        loop {
            if last != 0 && Duration::from_nanos(stamp.saturating_sub(last)) < NOTIFY_INTERVAL {
                return false;
            }
            match self.last_started.compare_exchange_weak(
                last,
                stamp,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => last = seen,
            }
        }
    }

    /// A committed `NOTIFY` that started after the first `covers`
    /// unannounced writes had committed.
    fn cover(&self, covers: u64) {
        self.covered.fetch_max(covers, Ordering::AcqRel);
    }

    /// The count of unannounced writes, when the committed `NOTIFY`s do not
    /// cover them all yet.
    fn uncovered(&self) -> Option<u64> {
        let target = self.unannounced.load(Ordering::Acquire);
        (self.covered.load(Ordering::Acquire) < target).then_some(target)
    }
}

/// The `NOTIFY` an append statement carries: bind [`Carry::channel`] as the
/// statement's channel parameter, and hand the carry to
/// [`PgEventStore::committed`] once the statement committed.
#[derive(Debug)]
pub(super) struct Carry {
    /// The unannounced writes committed before the statement started.
    covers: u64,
}

impl PgEventStore {
    /// Wakes this process's subscribers now (for example after committing a
    /// transaction that used [`PgEventStore::append_in_tx`]).
    pub fn wake_subscribers(&self) {
        self.shared.wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// How many `NOTIFY`s this store (and its clones) sent to wake
    /// subscribers of other processes: carried by appends, or sent by a
    /// transaction of their own. Not counted: those of
    /// [`PgEventStore::append_in_tx`], which ride on the caller's
    /// transaction.
    pub fn notify_stats(&self) -> NotifyStats {
        let notices = &self.shared.notices;
        NotifyStats {
            carried: notices.carried.load(Ordering::Relaxed),
            separate: notices.separate.load(Ordering::Relaxed),
        }
    }

    /// Called right before an append statement that can carry a `NOTIFY`:
    /// the `NOTIFY` it carries, when no other was started within the last
    /// interval (none when `NOTIFY` is off).
    pub(super) fn carry(&self) -> Option<Carry> {
        if !self.shared.settings.notify {
            return None;
        }
        let notices = &self.shared.notices;
        let now = Instant::now();
        notices
            .last_write
            .fetch_max(notices.stamp(now), Ordering::AcqRel);
        // Read before the claim, and so before the statement starts: the
        // writes counted committed before it.
        let covers = notices.unannounced.load(Ordering::Acquire);
        notices.claim(now).then_some(Carry { covers })
    }

    /// The channel parameter of an append statement: the channel when it
    /// carries a `NOTIFY`, NULL when not.
    pub(super) fn carry_channel(&self, carry: Option<&Carry>) -> Option<&str> {
        carry.map(|_| self.shared.channel.as_str())
    }

    /// Called once a write's statement or transaction committed: `carry`
    /// is the `NOTIFY` it carried, `wrote` whether it wrote events. A write
    /// without a `NOTIFY` is left to the notifier task.
    pub(super) fn committed(&self, carry: Option<Carry>, wrote: bool) {
        let notices = &self.shared.notices;
        if let Some(carry) = carry {
            notices.cover(carry.covers);
            notices.carried.fetch_add(1, Ordering::Relaxed);
        } else if wrote && self.shared.settings.notify {
            notices.unannounced.fetch_add(1, Ordering::AcqRel);
            self.signal_notifier();
        }
    }

    fn signal_notifier(&self) {
        let notices = &self.shared.notices;
        if !notices.notifier_started.swap(true, Ordering::AcqRel) {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(notifier(
                    Arc::downgrade(&self.shared),
                    Arc::clone(notices),
                    self.shared.pool.clone(),
                    self.shared.channel.clone(),
                    self.shared.notify_payload.clone(),
                ));
            } else {
                notices.notifier_started.store(false, Ordering::Release);
                return;
            }
        }
        notices.signal.notify_one();
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

/// Sends a `NOTIFY` in a transaction of its own for writes that committed
/// without one, once the interval of the last `NOTIFY` is over, unless an
/// append carried one that covers them meanwhile. Like the ones appends
/// carry, its payload names this store instance, whose own listener passes
/// over it.
async fn notifier(
    shared: Weak<Shared>,
    notices: Arc<Notices>,
    pool: PgPool,
    channel: String,
    payload: String,
) {
    loop {
        tokio::select! {
            () = notices.signal.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                if shared.strong_count() == 0 { return; }
                continue;
            }
        }
        while let Some(target) = notices.uncovered() {
            if let Some(wait) = notices.notifier_wait(Instant::now()) {
                tokio::time::sleep(wait).await;
                continue;
            }
            if !notices.claim(Instant::now()) {
                // An append took the interval; it may cover these writes.
                continue;
            }
            match sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(&payload)
                .execute(&pool)
                .await
            {
                Ok(_) => {
                    notices.cover(target);
                    notices.separate.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    // The next write retries; meanwhile subscribers
                    // elsewhere poll.
                    tracing::debug!(%error, channel, "NOTIFY failed; subscribers elsewhere fall back to polling");
                    break;
                }
            }
        }
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
/// notifications of other store instances (other processes) and of
/// `append_in_tx`, not for this instance's own, whose subscribers were woken
/// when it appended; reconnects after a lost connection (and bumps, since a
/// notification may have been missed meanwhile).
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
    use super::{notify_channel, Notices, NOTIFY_GRACE, NOTIFY_INTERVAL};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// One `NOTIFY` per interval: the first claim takes it, later ones
    /// within the interval are refused and told how long is left.
    #[tokio::test]
    async fn one_notify_is_claimed_per_interval() {
        let notices = Notices::new();
        let t0 = notices.base + Duration::from_millis(1);
        assert_eq!(notices.interval_left(t0), None);
        assert!(notices.claim(t0));
        let t1 = t0 + Duration::from_millis(2);
        assert!(!notices.claim(t1));
        assert_eq!(
            notices.interval_left(t1),
            Some(NOTIFY_INTERVAL - Duration::from_millis(2))
        );
        let t2 = t0 + NOTIFY_INTERVAL;
        assert_eq!(notices.interval_left(t2), None);
        assert!(notices.claim(t2));
        assert!(!notices.claim(t2));
        // A stamp older than the last claim (taken before it, checked after)
        // is refused too.
        assert!(!notices.claim(t1));
    }

    /// The notifier task waits for the interval to end, and a grace longer
    /// while append statements keep starting.
    #[tokio::test]
    async fn the_notifier_gives_starting_appends_a_grace() {
        let notices = Notices::new();
        let t0 = notices.base + Duration::from_millis(1);
        assert_eq!(notices.notifier_wait(t0), None);
        assert!(notices.claim(t0));
        assert_eq!(
            notices.notifier_wait(t0 + Duration::from_millis(1)),
            Some(NOTIFY_INTERVAL - Duration::from_millis(1))
        );
        assert_eq!(notices.notifier_wait(t0 + NOTIFY_INTERVAL), None);
        let write = t0 + Duration::from_millis(3);
        notices
            .last_write
            .store(notices.stamp(write), Ordering::Release);
        assert_eq!(
            notices.notifier_wait(t0 + NOTIFY_INTERVAL),
            Some(NOTIFY_GRACE)
        );
        assert_eq!(
            notices.notifier_wait(t0 + NOTIFY_INTERVAL + NOTIFY_GRACE),
            None
        );
        // Once no statement started for an interval, no grace.
        assert_eq!(notices.notifier_wait(write + NOTIFY_INTERVAL), None);
    }

    /// Writes are covered by a `NOTIFY` that started after they committed;
    /// an older one (covering fewer) never lowers what is covered.
    #[tokio::test]
    async fn writes_are_covered_by_a_later_notify() {
        let notices = Notices::new();
        assert_eq!(notices.uncovered(), None);
        notices.unannounced.fetch_add(2, Ordering::AcqRel);
        assert_eq!(notices.uncovered(), Some(2));
        notices.cover(1);
        assert_eq!(notices.uncovered(), Some(2));
        notices.cover(2);
        notices.cover(1);
        assert_eq!(notices.uncovered(), None);
    }

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
