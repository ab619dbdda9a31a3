//! Catching up with the global log, then following it live: the stream
//! `subscribe_all` returns, built from `read_all` and a wake-up signal, for
//! backends to reuse.

use std::future::Future;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;

use crate::{Position, RecordedEvent, StoreError};

/// Builds the stream `subscribe_all` returns from a page reader.
///
/// `read(after, max)` must return committed events after `after` in log order,
/// never skipping one that may still commit below the last it returns (that is
/// the backend's gap-safety). `wake` changes whenever new events may be
/// readable; the subscription also polls every `poll` in case a wake-up is
/// lost. It reads pages of `page_size` until caught up (a page shorter than
/// `page_size`: `read` returned all it could), then waits.
pub fn catch_up_then_live<R, Fut>(
    after: Position,
    page_size: usize,
    poll: Duration,
    wake: watch::Receiver<u64>,
    read: R,
) -> BoxStream<'static, Result<RecordedEvent, StoreError>>
where
    R: Fn(Position, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send + 'static,
{
    struct State<R> {
        position: Position,
        wake: watch::Receiver<u64>,
        read: R,
        failed: bool,
        /// The last page was short: everything readable then was read, so
        /// the next read waits for a wake-up (or the poll) first.
        caught_up: bool,
    }
    let state = State {
        position: after,
        wake,
        read,
        failed: false,
        caught_up: false,
    };
    // A future per page, not per event: the events of a page are handed out
    // by its iterator, as they are (not copied).
    let pages = stream::unfold(state, move |mut state| async move {
        if state.failed {
            return None;
        }
        loop {
            if std::mem::take(&mut state.caught_up) {
                // A wake-up that arrived since the last read (marked seen
                // before that read) ends this wait at once.
                let woke = tokio::time::timeout(poll, state.wake.changed()).await;
                if let Ok(Err(_)) = woke {
                    tokio::time::sleep(poll).await;
                }
            }
            // Mark the current wake-up as seen before reading, so a commit that
            // lands after the read still wakes the wait below.
            state.wake.borrow_and_update();
            match (state.read)(state.position, page_size).await {
                Ok(page) if !page.is_empty() => {
                    if let Some(last) = page.last() {
                        state.position = last.position;
                    }
                    state.caught_up = page.len() < page_size;
                    return Some((Ok(page), state));
                }
                Ok(_) => {
                    let woke = tokio::time::timeout(poll, state.wake.changed()).await;
                    if let Ok(Err(_)) = woke {
                        // The sender is gone: the store was dropped. Keep
                        // polling at the slower pace until nothing is left.
                        tokio::time::sleep(poll).await;
                    }
                }
                Err(error) => {
                    state.failed = true;
                    return Some((Err(error), state));
                }
            }
        }
    });
    pages
        .flat_map(|page| match page {
            Ok(events) => stream::iter(events.into_iter().map(Ok)).left_stream(),
            Err(error) => stream::iter(std::iter::once(Err(error))).right_stream(),
        })
        .boxed()
}
