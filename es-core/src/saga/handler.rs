//! The bus handler that feeds a saga.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use super::{Saga, SagaError, SagaManager};
use crate::bus::{Delivery, MessageHandler, Outcome};

/// A [`MessageHandler`] that feeds a saga: ack when handled (or a duplicate),
/// retry on transient failures (a lost race, the store unavailable or
/// failing), dead-letter what fails the same way every time (an input or
/// record that cannot be decoded, a write the store refuses as such).
pub struct SagaHandler<S: Saga>(pub Arc<SagaManager<S>>);

impl<S: Saga> fmt::Debug for SagaHandler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SagaHandler").field(&self.0).finish()
    }
}

#[async_trait]
impl<S: Saga> MessageHandler for SagaHandler<S> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        match self.0.handle(&delivery.message).await {
            Ok(_) => Outcome::Ack,
            Err(error) if error.is_transient() => Outcome::retry(error),
            // A lost race or a backend failure may pass; a write the store
            // refuses as such never will.
            Err(SagaError::Store(error)) if !error.is_deterministic() => Outcome::retry(error),
            Err(error) => Outcome::dead_letter(error),
        }
    }
}
