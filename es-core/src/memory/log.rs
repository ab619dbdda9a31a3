//! The in-memory store's global log: every event in commit order.

use std::ops::Index;

use crate::RecordedEvent;

/// Events per chunk.
const CHUNK: usize = 4_096;

/// The events in commit order, kept in chunks of [`CHUNK`] events.
///
/// Growing never moves a stored event: a full chunk stays where it is and the
/// next one is started. One vector would instead copy the whole log each time
/// it doubles, under the store's write lock, and a long-running embedded
/// system holds millions of events.
#[derive(Debug, Default)]
pub(super) struct Log {
    chunks: Vec<Vec<RecordedEvent>>,
    len: usize,
}

impl Log {
    /// How many events it holds.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends an event at index `len()`.
    pub(super) fn push(&mut self, event: RecordedEvent) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(event),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(event);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
    }

    /// Copies of the events at indexes `start..end` (clamped to the log).
    pub(super) fn copy_range(&self, start: usize, end: usize) -> Vec<RecordedEvent> {
        let end = end.min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        let mut at = start;
        while at < end {
            let chunk = &self.chunks[at / CHUNK];
            let from = at % CHUNK;
            let to = (from + (end - at)).min(chunk.len());
            out.extend_from_slice(&chunk[from..to]);
            at += to - from;
        }
        out
    }
}

impl Index<usize> for Log {
    type Output = RecordedEvent;

    fn index(&self, index: usize) -> &RecordedEvent {
        &self.chunks[index / CHUNK][index % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metadata, Payload, Position, StreamId};
    use chrono::Utc;
    use uuid::Uuid;

    fn event(i: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: StreamId::new("s").unwrap(),
            stream_version: i + 1,
            position: Position::new(i + 1, 0),
            event_type: "E".into(),
            schema_version: 1,
            payload: Payload::from_trusted_json("{}"),
            metadata: Metadata::new(),
            recorded_at: Utc::now(),
            tags: Default::default(),
        }
    }

    #[test]
    fn indexes_and_ranges_cross_chunk_boundaries() {
        let mut log = Log::default();
        let total = 2 * CHUNK + 7;
        for i in 0..total {
            log.push(event(i as u64));
        }
        assert_eq!(log.len(), total);
        for i in [0, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, total - 1] {
            assert_eq!(log[i].stream_version, i as u64 + 1);
        }
        let range = log.copy_range(CHUNK - 3, 2 * CHUNK + 2);
        let versions: Vec<u64> = range.iter().map(|e| e.stream_version).collect();
        let expected: Vec<u64> = ((CHUNK - 3) as u64 + 1..=(2 * CHUNK + 2) as u64).collect();
        assert_eq!(versions, expected);
        assert_eq!(log.copy_range(total - 2, total + 100).len(), 2);
        assert!(log.copy_range(total, total + 1).is_empty());
        assert!(log.copy_range(5, 5).is_empty());
    }
}
