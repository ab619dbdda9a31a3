//! Upcasters: old stored payloads read as the current schema.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::CodecError;
use crate::Payload;

type Transform = dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync;

/// Turns the payload of one stored event type and schema version into the next
/// version (and optionally a new type name), so old history is read as current
/// events without ever being rewritten.
#[derive(Clone)]
pub struct Upcaster {
    event_type: String,
    from_version: u32,
    renamed_to: Option<String>,
    transform: Arc<Transform>,
}

impl fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcaster")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("renamed_to", &self.renamed_to)
            .finish_non_exhaustive()
    }
}

impl Upcaster {
    /// An upcaster from `event_type` at `from_version` to `from_version + 1`.
    pub fn new(
        event_type: impl Into<String>,
        from_version: u32,
        transform: impl Fn(serde_json::Value) -> Result<serde_json::Value, String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self {
            event_type: event_type.into(),
            from_version,
            renamed_to: None,
            transform: Arc::new(transform),
        }
    }

    /// Also renames the type: the upcast payload is read as `new_type` at
    /// `from_version + 1`.
    #[must_use]
    pub fn renamed_to(mut self, new_type: impl Into<String>) -> Self {
        self.renamed_to = Some(new_type.into());
        self
    }
}

/// The registry of upcasters every read path decodes through.
#[derive(Clone, Debug, Default)]
pub struct Upcasters {
    by_type: HashMap<(String, u32), Upcaster>,
}

impl Upcasters {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an upcaster; a later one for the same type and version replaces
    /// the earlier.
    pub fn register(&mut self, upcaster: Upcaster) {
        self.by_type.insert(
            (upcaster.event_type.clone(), upcaster.from_version),
            upcaster,
        );
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Runs every upcaster that applies, in order of version, and returns the
    /// current type name, version and payload (`None` when none applied).
    pub fn upcast(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<Option<(String, u32, Payload)>, CodecError> {
        let mut current: Option<(String, u32, serde_json::Value)> = None;
        loop {
            let (ty, version) = match &current {
                Some((ty, version, _)) => (ty.as_str(), *version),
                None => (event_type, schema_version),
            };
            let Some(upcaster) = self.by_type.get(&(ty.to_owned(), version)) else {
                break;
            };
            let value = match current.take() {
                Some((_, _, value)) => value,
                None => payload.to_value().map_err(|e| CodecError::Upcast {
                    event_type: event_type.to_owned(),
                    from_version: schema_version,
                    reason: e.to_string(),
                })?,
            };
            let next = (upcaster.transform)(value).map_err(|reason| CodecError::Upcast {
                event_type: upcaster.event_type.clone(),
                from_version: upcaster.from_version,
                reason,
            })?;
            let next_type = upcaster
                .renamed_to
                .clone()
                .unwrap_or_else(|| upcaster.event_type.clone());
            current = Some((next_type, upcaster.from_version + 1, next));
        }
        current
            .map(|(ty, version, value)| {
                Payload::from_value(&value)
                    .map(|p| (ty, version, p))
                    .map_err(|e| CodecError::Upcast {
                        event_type: event_type.to_owned(),
                        from_version: schema_version,
                        reason: e.to_string(),
                    })
            })
            .transpose()
    }
}
