//! Event rows decoded in place: each column is read from the row's bytes
//! (borrowed `&str`s, no intermediate `String`s), the column types are
//! checked on a page's first row only, and the event types of a page are
//! allocated once each. An event costs the allocation of its
//! payload, and of its metadata when it has any.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use es_core::{Payload, RecordedEvent, StreamEvent, StreamId};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::read::{metadata_of, position_of, tags_of, to_u64};
use crate::error::{Error, Result};

/// The columns of a stream read for a replay ([`StreamEvent`]), in the
/// order [`Page::stream_event`] reads them.
pub(super) const REPLAY_COLUMNS: &str =
    "stream_version, event_id, event_type, schema_version, payload::text";

/// The columns of a stream read ([`RecordedEvent`]), in the order
/// [`Page::recorded_event`] reads them: the stream id is known, so not sent.
pub(super) const STREAM_COLUMNS: &str = "global_position, transaction_id, stream_version, \
     event_id, event_type, schema_version, payload::text, metadata::text, recorded_at, tags";

/// What a page of rows decodes with: the event types met so far, and
/// whether the column types are checked yet.
#[derive(Default)]
pub(super) struct Page {
    /// The event types of the page, each allocated once: a stream's events
    /// share a handful of types.
    types: Vec<Arc<str>>,
    /// Whether a row of the page was decoded with its column types checked:
    /// every row of a result has the same columns, so the others skip the
    /// check.
    checked: bool,
}

impl Page {
    /// Types kept for sharing; a page with more allocates the others.
    const KEPT: usize = 16;

    fn get<'r, T>(&self, row: &'r PgRow, i: usize) -> Result<T>
    where
        T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        if self.checked {
            row.try_get_unchecked(i)
        } else {
            row.try_get(i)
        }
        .map_err(|e| Error::Corrupt {
            reason: format!("column {i} of an event row: {e}"),
        })
    }

    fn event_type(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.types.iter().find(|t| ***t == *name) {
            return Arc::clone(known);
        }
        let new: Arc<str> = Arc::from(name);
        if self.types.len() < Self::KEPT {
            self.types.push(Arc::clone(&new));
        }
        new
    }
}

impl Page {
    /// A row of [`REPLAY_COLUMNS`].
    pub(super) fn stream_event(&mut self, row: &PgRow) -> Result<StreamEvent> {
        let version: i64 = self.get(row, 0)?;
        let event_id: Uuid = self.get(row, 1)?;
        let event_type = self.event_type(self.get(row, 2)?);
        let schema_version: i32 = self.get(row, 3)?;
        let payload: &str = self.get(row, 4)?;
        self.checked = true;
        Ok(StreamEvent {
            event_id,
            stream_version: to_u64(version),
            event_type,
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            payload: Payload::from_trusted_json(payload),
        })
    }

    /// A row of [`STREAM_COLUMNS`], an event of `stream`.
    pub(super) fn recorded_event(
        &mut self,
        row: &PgRow,
        stream: &StreamId,
    ) -> Result<RecordedEvent> {
        let global: i64 = self.get(row, 0)?;
        let tx: i64 = self.get(row, 1)?;
        let version: i64 = self.get(row, 2)?;
        let event_id: Uuid = self.get(row, 3)?;
        let event_type = self.event_type(self.get(row, 4)?);
        let schema_version: i32 = self.get(row, 5)?;
        let payload: &str = self.get(row, 6)?;
        let metadata: &str = self.get(row, 7)?;
        let recorded_at: DateTime<Utc> = self.get(row, 8)?;
        let tags: Option<Vec<String>> = self.get(row, 9)?;
        self.checked = true;
        Ok(RecordedEvent {
            event_id,
            stream_id: stream.clone(),
            stream_version: to_u64(version),
            position: position_of(tx, global),
            event_type,
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            payload: Payload::from_trusted_json(payload),
            metadata: metadata_of(metadata, event_id)?,
            recorded_at,
            tags: tags_of(tags, event_id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_shared() {
        let mut page = Page::default();
        let a = page.event_type("A");
        let b = page.event_type("A");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &page.event_type("B")));
    }
}
