//! Group commit: appends (and atomic multi-stream writes) that arrive while
//! the store's writes are all busy wait in a queue and are written together,
//! in one statement, one transaction and one commit.
//!
//! A single-event append costs a commit (a WAL flush) and a round trip, and at
//! a few dozen concurrent writers those dominate. The store lets up to
//! `max_in_flight` appends run at once, each on its own connection, exactly as
//! without grouping. An append that arrives when all of them are running is
//! queued; whichever running append finishes first hands the queue to a task
//! that writes up to `max_group` queued appends with one call of the
//! `append_group` function, and so on until the queue is empty. An append that
//! finds a slot free (always the case with one writer) runs at once: grouping
//! adds no latency when there is nothing to group.
//!
//! Every append in a group is decided on its own (expected version,
//! idempotency); a refused one does not stop the others. If the group's
//! statement fails as a whole (a payload PostgreSQL refuses, a deadlock, a
//! lost connection), nothing of it was written and each append is retried on
//! its own, so each caller gets the error that is its own.
//!
//! An append that was queued is written even if its caller stops waiting
//! (its future is dropped, a timeout fires): as with any append whose answer
//! was not received, its outcome is unknown to the caller, who retries with
//! the same event ids to find out.

use std::collections::VecDeque;
use std::sync::Mutex;

use es_core::{AppendResult, StoreError, StreamAppend};
use tokio::sync::oneshot;

/// The default number of appends (single, or groups) in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// The default largest number of appends one group holds.
pub const DEFAULT_MAX_GROUP: usize = 32;
/// The largest group: each append of a group runs in a subtransaction, and a
/// transaction with more than 64 subtransactions slows every snapshot in the
/// cluster.
pub const MAX_GROUP_LIMIT: usize = 60;

/// The answer to one write: a result per part.
pub(crate) type Answer = Result<Vec<AppendResult>, StoreError>;

/// One write waiting for a group: an append (one part) or an atomic
/// multi-stream write.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) parts: Vec<StreamAppend>,
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// Whether a write runs now or waits for a group.
pub(crate) enum Turn {
    /// Run it now; when done, call [`GroupCommit::next_group`] (or hand the
    /// queue over) so queued writes are not stranded.
    Run(Vec<StreamAppend>),
    /// It is queued: the answer comes through here.
    Wait(oneshot::Receiver<Answer>),
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    queue: VecDeque<Waiting>,
}

/// The queue and the count of appends in flight.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    max_in_flight: usize,
    max_group: usize,
}

impl GroupCommit {
    pub(crate) fn new(max_in_flight: usize, max_group: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_in_flight: max_in_flight.max(1),
            max_group: max_group.clamp(1, MAX_GROUP_LIMIT),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a counter and a queue, consistent after every
        // statement: a panic elsewhere cannot leave it half-updated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot if one is free, else queues the write.
    pub(crate) fn enter(&self, parts: Vec<StreamAppend>) -> Turn {
        let mut state = self.lock();
        if state.in_flight < self.max_in_flight {
            state.in_flight += 1;
            Turn::Run(parts)
        } else {
            let (reply, answer) = oneshot::channel();
            state.queue.push_back(Waiting { parts, reply });
            Turn::Wait(answer)
        }
    }

    /// Called by the holder of a slot when it is done: the next group to
    /// write (keeping the slot), or `None` (the slot is given back) when
    /// nothing waits.
    pub(crate) fn next_group(&self) -> Option<Vec<Waiting>> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.in_flight = state.in_flight.saturating_sub(1);
            return None;
        }
        let n = state.queue.len().min(self.max_group);
        Some(state.queue.drain(..n).collect())
    }

    /// Gives a slot back and fails everything queued (no runtime is left to
    /// write it).
    pub(crate) fn abandon(&self, error: impl Fn() -> StoreError) {
        let waiting: Vec<Waiting> = {
            let mut state = self.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
            state.queue.drain(..).collect()
        };
        for w in waiting {
            let _ = w.reply.send(Err(error()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_core::{ExpectedVersion, StreamId};

    fn stream(n: u32) -> Vec<StreamAppend> {
        let id = StreamId::new(format!("s-{n}")).unwrap();
        vec![StreamAppend::new(id, ExpectedVersion::Any, vec![])]
    }

    #[test]
    fn appends_run_while_slots_are_free_then_queue_and_group() {
        let g = GroupCommit::new(2, 3);
        for n in 0..2 {
            assert!(matches!(g.enter(stream(n)), Turn::Run(..)));
        }
        let mut answers = Vec::new();
        for n in 2..7 {
            match g.enter(stream(n)) {
                Turn::Wait(answer) => answers.push(answer),
                Turn::Run(..) => panic!("a third append ran with two slots"),
            }
        }
        // The first slot to finish takes a group of at most 3, in arrival order.
        let group = g.next_group().unwrap();
        let names: Vec<_> = group
            .iter()
            .map(|w| w.parts[0].stream.as_str().to_owned())
            .collect();
        assert_eq!(names, ["s-2", "s-3", "s-4"]);
        let rest = g.next_group().unwrap();
        assert_eq!(rest.len(), 2);
        // Nothing waits: both slots are given back and a new append runs.
        assert!(g.next_group().is_none());
        assert!(g.next_group().is_none());
        assert!(matches!(g.enter(stream(9)), Turn::Run(..)));
        assert!(matches!(g.enter(stream(10)), Turn::Run(..)));
        assert!(matches!(g.enter(stream(11)), Turn::Wait(_)));
    }

    #[test]
    fn abandoning_fails_every_waiting_append() {
        let g = GroupCommit::new(1, 8);
        assert!(matches!(g.enter(stream(0)), Turn::Run(..)));
        let Turn::Wait(mut answer) = g.enter(stream(1)) else {
            panic!("queued expected");
        };
        g.abandon(|| StoreError::Unavailable {
            source: "gone".into(),
        });
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(StoreError::Unavailable { .. }))
        ));
        assert!(matches!(g.enter(stream(2)), Turn::Run(..)));
    }
}
