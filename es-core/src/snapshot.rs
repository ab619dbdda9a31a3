//! Snapshots of aggregate state, so loading reads only the tail of a stream.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{Payload, StoreError, StreamId};

/// An aggregate's state as of one version of its stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The stream it was taken from.
    pub stream_id: StreamId,
    /// The stream version the state includes.
    pub version: u64,
    /// A version of the state's own schema: a snapshot whose schema version
    /// differs from the current one is ignored and the stream replayed.
    pub schema_version: u32,
    /// The serialized state.
    pub state: Payload,
}

/// Where snapshots are kept. Object-safe: use it as `Arc<dyn SnapshotStore>`.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Stores a snapshot, replacing an older one of the same stream. A snapshot
    /// older than the stored one is ignored.
    async fn save(&self, snapshot: Snapshot) -> Result<(), StoreError>;
    /// The latest snapshot of a stream.
    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError>;
}

/// When the repository takes a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// Never.
    Never,
    /// Whenever a command's events carry the stream across a multiple of `n`
    /// versions.
    Every(u64),
}

impl SnapshotPolicy {
    /// Whether going from `before` to `after` calls for a snapshot.
    pub fn should_snapshot(self, before: u64, after: u64) -> bool {
        match self {
            Self::Never => false,
            Self::Every(0) => false,
            Self::Every(n) => before / n != after / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SnapshotPolicy;

    #[test]
    fn every_n_fires_on_crossing_a_multiple() {
        let p = SnapshotPolicy::Every(10);
        assert!(!p.should_snapshot(0, 9));
        assert!(p.should_snapshot(9, 10));
        assert!(p.should_snapshot(8, 23));
        assert!(!p.should_snapshot(10, 19));
        assert!(!SnapshotPolicy::Never.should_snapshot(0, 100));
        assert!(!SnapshotPolicy::Every(0).should_snapshot(0, 100));
    }
}
