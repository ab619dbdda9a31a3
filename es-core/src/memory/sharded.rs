//! The in-memory store's indexes: hash maps in shards.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::ops::Index;

use uuid::Uuid;

use crate::StreamId;

/// The maps' hasher. Stream ids and event ids are hashed on every append;
/// foldhash (randomly seeded, hashbrown's default) does that several times
/// faster than the standard library's SipHash.
type FastHash = foldhash::fast::RandomState;

/// Shards per map: a power of two, picked by a hash's top bits.
const SHARDS: usize = 32;
const _: () = assert!(SHARDS.is_power_of_two());

/// A hash map split into [`SHARDS`] maps by the key's hash.
///
/// A map that outgrows its table moves every entry into a new one, and the
/// store does that under its write lock: at about two million events one
/// map took 47 ms, during which no append and no read got the lock, and the
/// pause doubles with every doubling of the log. Split, each shard grows on
/// its own and moves a thirty-second of the entries; the total work is the
/// same. (With 64 shards, single-event appends in the `memory_store` bench
/// were up to 11 % slower in four runs of five; with 8 or 32, not
/// measurably.)
#[derive(Debug)]
pub(super) struct ShardedMap<K, V> {
    /// Picks the shard (its own seed: the shards' hashers see other bits).
    pick: FastHash,
    shards: Box<[HashMap<K, V, FastHash>]>,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self {
            pick: FastHash::default(),
            shards: (0..SHARDS).map(|_| HashMap::default()).collect(),
        }
    }
}

/// A key that picks its shard.
pub(super) trait ShardKey: Hash + Eq {
    /// 64 well-mixed bits of the key; `pick` is there for keys that must be
    /// hashed to get them.
    fn spread(&self, pick: &FastHash) -> u64;
}

impl ShardKey for StreamId {
    fn spread(&self, pick: &FastHash) -> u64 {
        pick.hash_one(self)
    }
}

impl ShardKey for Uuid {
    /// Event ids are random where it counts (v4, v5 and v7 alike): their bits
    /// are mixed, not hashed, which keeps an append's extra cost to a
    /// multiplication per id.
    fn spread(&self, _: &FastHash) -> u64 {
        let (high, low) = self.as_u64_pair();
        (high ^ low).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl<K: ShardKey, V> ShardedMap<K, V> {
    fn shard_of(&self, key: &K) -> usize {
        (key.spread(&self.pick) >> (u64::BITS - SHARDS.trailing_zeros())) as usize
    }

    /// The value of `key`, if any.
    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard_of(key)].get(key)
    }

    /// Whether `key` has a value.
    pub(super) fn contains_key(&self, key: &K) -> bool {
        self.shards[self.shard_of(key)].contains_key(key)
    }

    /// Sets the value of `key`, giving back the one it replaces.
    pub(super) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        self.shards[shard].insert(key, value)
    }

    /// The entry of `key`, to read or fill in place.
    pub(super) fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let shard = self.shard_of(&key);
        self.shards[shard].entry(key)
    }

    /// How many keys it holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }
}

impl<K: ShardKey, V> Index<&K> for ShardedMap<K, V> {
    type Output = V;

    /// # Panics
    /// If `key` has no value, as a `HashMap` does.
    fn index(&self, key: &K) -> &V {
        &self.shards[self.shard_of(key)][key]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut map = ShardedMap::default();
        let ids: Vec<Uuid> = (0..1_000).map(|_| Uuid::now_v7()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(map.insert(*id, i), None);
        }
        assert_eq!(map.insert(ids[7], 0), Some(7));
        *map.entry(ids[8]).or_insert(0) += 1;
        let new = Uuid::now_v7();
        *map.entry(new).or_insert(5) += 1;
        assert_eq!((map[&ids[7]], map[&ids[8]], map[&new]), (0, 9, 6));
        assert!(map.contains_key(&ids[999]) && !map.contains_key(&Uuid::nil()));
        assert_eq!(map.get(&ids[3]), Some(&3));
        assert_eq!(map.len(), 1_001);
    }

    /// No shard is empty or holds more than twice its share, for event ids
    /// of every kind the store sees and for stream ids.
    #[test]
    fn spreads_ids_and_streams_over_every_shard() {
        fn check<K: ShardKey>(keys: impl Iterator<Item = K>) {
            let mut map = ShardedMap::default();
            keys.for_each(|k| {
                map.insert(k, ());
            });
            let share = map.len() / SHARDS;
            let sizes: Vec<usize> = map.shards.iter().map(HashMap::len).collect();
            assert!(
                sizes.iter().all(|n| (share / 2..=2 * share).contains(n)),
                "{sizes:?}"
            );
        }
        check((0..20_000).map(|_| Uuid::now_v7()));
        check((0..20_000).map(|_| Uuid::new_v4()));
        check((0..20_000u32).map(|i| crate::derived_id(Uuid::nil(), "s", i)));
        check((0..20_000u32).map(|i| StreamId::for_aggregate("order", i).unwrap()));
    }
}
