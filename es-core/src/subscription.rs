//! A catch-up-then-live subscription built from `read_all` and a wake-up
//! signal, for backends to reuse.

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
/// lost. It reads pages of `page_size` until caught up, then waits.
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
        /// The rest of the last page read (taken as it is, not copied).
        buffer: std::vec::IntoIter<RecordedEvent>,
        wake: watch::Receiver<u64>,
        read: R,
        failed: bool,
    }
    let state = State {
        position: after,
        buffer: Vec::new().into_iter(),
        wake,
        read,
        failed: false,
    };
    stream::unfold(state, move |mut state| async move {
        if state.failed {
            return None;
        }
        loop {
            if let Some(event) = state.buffer.next() {
                state.position = event.position;
                return Some((Ok(event), state));
            }
            // Mark the current wake-up as seen before reading, so a commit that
            // lands after the read still wakes the wait below.
            state.wake.borrow_and_update();
            match (state.read)(state.position, page_size).await {
                Ok(page) if !page.is_empty() => state.buffer = page.into_iter(),
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
    })
    .boxed()
}
