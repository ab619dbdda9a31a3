//! The [`Repository`](crate::Repository)'s cache of aggregate states.
//!
//! An entry is an aggregate's state with the stream version it reflects. A
//! command takes the entry out (so two commands never share a state), decides
//! on it, and appends expecting its version; once the events are appended the
//! new state goes back. A command on the same aggregate running at the same
//! time finds no entry and loads in full. A stale entry is never wrong, only
//! short of the tail: the append expecting its version fails, and the command
//! reads the tail from there.
//!
//! Eviction is by two generations: entries live in `young`; when it is full it
//! becomes `old` (dropping the previous `old`), and an entry found in `old` is
//! moved back to `young`. That keeps the recently used aggregates, up to
//! twice the capacity, at O(1) per access.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::StreamId;

/// A cached state and the stream version it reflects.
pub(crate) struct Entry<A> {
    pub(crate) state: A,
    pub(crate) version: u64,
}

struct Generations<A> {
    young: HashMap<StreamId, Entry<A>, foldhash::fast::RandomState>,
    old: HashMap<StreamId, Entry<A>, foldhash::fast::RandomState>,
}

pub(crate) struct StateCache<A> {
    generations: Mutex<Generations<A>>,
    capacity: usize,
}

impl<A> StateCache<A> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            generations: Mutex::new(Generations {
                young: HashMap::default(),
                old: HashMap::default(),
            }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations<A>> {
        // Two maps, consistent after every statement: a panic elsewhere cannot
        // leave them half-updated.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the entry of `stream` out of the cache.
    pub(crate) fn take(&self, stream: &StreamId) -> Option<Entry<A>> {
        let mut g = self.lock();
        g.young.remove(stream).or_else(|| g.old.remove(stream))
    }

    /// Puts an entry (back) in, unless a newer one is there already.
    pub(crate) fn put(&self, stream: StreamId, entry: Entry<A>) {
        let evicted = {
            let mut g = self.lock();
            if let Some(present) = g.young.get(&stream).or_else(|| g.old.get(&stream)) {
                if present.version >= entry.version {
                    return;
                }
            }
            g.old.remove(&stream);
            let evicted = if g.young.len() >= self.capacity {
                // Sized for a whole generation: it fills without rehashing.
                let fresh = HashMap::with_capacity_and_hasher(self.capacity, Default::default());
                let young = std::mem::replace(&mut g.young, fresh);
                Some(std::mem::replace(&mut g.old, young))
            } else {
                None
            };
            g.young.insert(stream, entry);
            evicted
        };
        // Freeing a generation of states takes a while: not under the lock,
        // which every command on every aggregate of this type waits for.
        drop(evicted);
    }

    /// How many entries it holds.
    pub(crate) fn len(&self) -> usize {
        let g = self.lock();
        g.young.len() + g.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u32) -> StreamId {
        StreamId::new(format!("s-{n}")).unwrap()
    }

    #[test]
    fn take_removes_and_put_keeps_the_newest() {
        let cache = StateCache::new(4);
        cache.put(
            s(1),
            Entry {
                state: "v2",
                version: 2,
            },
        );
        cache.put(
            s(1),
            Entry {
                state: "v1",
                version: 1,
            },
        );
        let entry = cache.take(&s(1)).unwrap();
        assert_eq!((entry.state, entry.version), ("v2", 2));
        assert!(cache.take(&s(1)).is_none());
    }

    #[test]
    fn recently_used_entries_survive_eviction() {
        let cache = StateCache::new(2);
        cache.put(
            s(1),
            Entry {
                state: 1,
                version: 1,
            },
        );
        cache.put(
            s(2),
            Entry {
                state: 2,
                version: 1,
            },
        );
        // Full: s1 and s2 become the old generation.
        cache.put(
            s(3),
            Entry {
                state: 3,
                version: 1,
            },
        );
        // s1 is used again: back to the young generation.
        let one = cache.take(&s(1)).unwrap();
        cache.put(s(1), one);
        // Full again: s3 and s1 become old, s2 is dropped.
        cache.put(
            s(4),
            Entry {
                state: 4,
                version: 1,
            },
        );
        assert!(cache.take(&s(2)).is_none());
        for n in [1, 3, 4] {
            assert!(cache.take(&s(n)).is_some(), "s-{n} evicted");
        }
        assert_eq!(cache.len(), 0);
    }
}
