//! The inbox: which messages a consumer has already processed.

use async_trait::async_trait;
use uuid::Uuid;

use crate::StoreError;

/// The ids of messages a consumer has already processed, for exactly-once
/// effects under at-least-once delivery.
#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Records that `consumer` processed `message_id`. Returns `true` the first
    /// time and `false` when it was already recorded.
    async fn record(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError>;
    /// Whether `consumer` has processed `message_id`.
    async fn contains(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError>;
    /// Removes the record of `message_id`, so that it counts as not
    /// processed again: for a consumer that claims a message before an
    /// effect outside the store (sending an email) and then learns the
    /// effect certainly did not happen. Returns whether it was recorded.
    async fn forget(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError>;
}
