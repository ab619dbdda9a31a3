use chrono::{DateTime, Utc};

use crate::{
    DomainEvent, EventCodec, Metadata, Position, Projection, ProjectionError, RecordedEvent,
    StreamId,
};

/// Records domain events as a store would: versions from 1 on `stream`,
/// positions `(first_position + i, 0)`, now as the recorded time.
///
/// # Panics
/// When an event does not encode (a test fixture bug).
pub fn recorded<E: DomainEvent>(
    stream: &StreamId,
    first_position: u64,
    events: impl IntoIterator<Item = E>,
) -> Vec<RecordedEvent> {
    recorded_at(stream, first_position, Utc::now(), events)
}

/// Like [`recorded`], at a given time.
///
/// # Panics
/// When an event does not encode (a test fixture bug).
pub fn recorded_at<E: DomainEvent>(
    stream: &StreamId,
    first_position: u64,
    at: DateTime<Utc>,
    events: impl IntoIterator<Item = E>,
) -> Vec<RecordedEvent> {
    let codec = EventCodec::<E>::new();
    (0u64..)
        .zip(events)
        .map(|(i, event)| {
            let new = codec
                .encode(&event, Metadata::new())
                .unwrap_or_else(|e| panic!("fixture event does not encode: {e}"));
            RecordedEvent {
                event_id: new.event_id,
                stream_id: stream.clone(),
                stream_version: i + 1,
                position: Position::new(first_position + i, 0),
                event_type: new.event_type,
                schema_version: new.schema_version,
                payload: new.payload,
                metadata: new.metadata,
                recorded_at: at,
            }
        })
        .collect()
}

/// Given recorded events, applies the ones the projection accepts, in order,
/// inside `tx` — what a runner does, minus the checkpoint.
pub async fn project<P: Projection>(
    projection: &P,
    tx: &mut P::Tx,
    events: &[RecordedEvent],
) -> Result<(), ProjectionError> {
    for event in events {
        if projection.accepts(&event.event_type) {
            projection.apply(tx, event).await?;
        }
    }
    Ok(())
}
