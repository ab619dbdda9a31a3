//! Checkpoints: how far a runner that follows the global log has got.

use async_trait::async_trait;

use crate::{Position, StoreError};

/// Named positions in the global log, kept by the runners that follow it
/// (projections, relays).
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The stored position of `name`, if any.
    async fn load(&self, name: &str) -> Result<Option<Position>, StoreError>;
    /// Stores the position of `name`.
    async fn save(&self, name: &str, position: Position) -> Result<(), StoreError>;
}
