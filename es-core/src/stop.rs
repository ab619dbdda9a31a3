//! Stop signals: the `watch::Receiver<bool>` every long-running task of these
//! crates (relays, consumers, schedulers, runners) takes, which turns true to
//! stop it.
//!
//! A signal whose sender is gone counts as a stop: nobody is left to stop the
//! task, and a loop that waited on `changed()` would otherwise wake at once,
//! every time, and spin.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use es_core::stop;
//! let (tx, mut rx) = tokio::sync::watch::channel(false);
//! assert!(!stop::is_requested(&rx));
//! drop(tx);
//! assert!(stop::is_requested(&rx));
//! stop::requested(&mut rx).await; // resolves at once
//! # });
//! ```

use tokio::sync::watch;

/// Whether `stop` has turned true or lost its sender.
pub fn is_requested(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Resolves once `stop` turns true or loses its sender.
pub async fn requested(stop: &mut watch::Receiver<bool>) {
    // `wait_for` fails only when the sender is gone: a stop too.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn true_or_a_dropped_sender_is_a_stop_and_false_is_not() {
        let (tx, mut rx) = watch::channel(false);
        tx.send_replace(false);
        assert!(!is_requested(&rx));
        let waited = tokio::time::timeout(Duration::from_millis(20), requested(&mut rx)).await;
        assert!(waited.is_err(), "a change to false is not a stop");
        tx.send_replace(true);
        assert!(is_requested(&rx));
        requested(&mut rx).await;
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(is_requested(&rx));
        requested(&mut rx).await;
    }
}
