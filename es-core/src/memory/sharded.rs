//! The in-memory store's indexes: hash maps in shards.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::ops::Index;

/// The maps' hasher. Stream ids and event ids are hashed on every append;
/// foldhash (randomly seeded, hashbrown's default) does that several times
/// faster than the standard library's SipHash.
type FastHash = foldhash::fast::RandomState;

/// Shards per map.
const SHARDS: usize = 64;

/// A hash map split into [`SHARDS`] maps by the key's hash.
///
/// A map that outgrows its table moves every entry into a new one, and the
/// store does that under its write lock: at about two million events one
/// map took 47 ms, during which no append and no read got the lock, and the
/// pause doubles with every doubling of the log. Split, each shard grows on
/// its own and moves a sixty-fourth of the entries; the total work is the
/// same.
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

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    fn shard_of(&self, key: &K) -> usize {
        // The hash's top bits: SHARDS is a power of two.
        (self.pick.hash_one(key) >> (u64::BITS - SHARDS.trailing_zeros())) as usize
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

impl<K: Hash + Eq, V> Index<&K> for ShardedMap<K, V> {
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
    fn behaves_as_one_map_and_spreads_its_keys() {
        let mut map = ShardedMap::default();
        for i in 0..10_000u32 {
            assert_eq!(map.insert(i, i * 2), None);
        }
        assert_eq!(map.insert(7, 0), Some(14));
        *map.entry(8).or_insert(0) += 1;
        *map.entry(20_000).or_insert(5) += 1;
        assert_eq!((map[&7], map[&8], map[&20_000]), (0, 17, 6));
        assert!(map.contains_key(&9_999) && !map.contains_key(&10_000));
        assert_eq!(map.get(&3), Some(&6));
        assert_eq!(map.len(), 10_001);
        // No shard is empty or holds more than twice its share.
        let share = map.len() / SHARDS;
        assert!(
            map.shards
                .iter()
                .all(|s| (1..=2 * share).contains(&s.len())),
            "{:?}",
            map.shards.iter().map(HashMap::len).collect::<Vec<_>>()
        );
    }
}
