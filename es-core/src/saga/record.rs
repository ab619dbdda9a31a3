//! The stored forms of what a saga sends and schedules: command and
//! deadline records in the saga's stream.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::COMMAND_RECORD;
use crate::bus::Message;
use crate::{CodecError, Payload, RecordedEvent};

/// The stored form of a command a saga sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// The topic that handles it.
    pub topic: String,
    /// The command's type name.
    pub command_type: String,
    /// The command's schema version.
    pub schema_version: u32,
    /// The command's payload.
    pub payload: Payload,
}

impl CommandRecord {
    /// The record as stored: the JSON its `Serialize` gives, written
    /// directly so the command's payload, already JSON, is not parsed again.
    ///
    /// # Errors
    /// Never, in practice: the strings always serialize.
    pub fn to_payload(&self) -> Result<Payload, CodecError> {
        use std::fmt::Write as _;
        let command = self.payload.as_str();
        let mut json =
            String::with_capacity(72 + self.topic.len() + self.command_type.len() + command.len());
        json.push_str("{\"topic\":");
        push_json_string(&mut json, &self.topic)?;
        json.push_str(",\"command_type\":");
        push_json_string(&mut json, &self.command_type)?;
        // Writing into a String cannot fail.
        let _ = write!(
            json,
            ",\"schema_version\":{},\"payload\":",
            self.schema_version
        );
        json.push_str(command);
        json.push('}');
        Ok(Payload::from_trusted_json(json))
    }

    /// The bus message for a stored command record: the record's event id
    /// becomes the message id, so a resent command is recognised.
    pub fn to_message(&self, recorded: &RecordedEvent) -> Message {
        Message {
            message_id: recorded.event_id,
            topic: self.topic.as_str().into(),
            message_type: self.command_type.as_str().into(),
            schema_version: self.schema_version,
            payload: self.payload.clone(),
            metadata: recorded.metadata.clone(),
            source: None,
        }
    }

    /// The bus message for a stored command record, read straight from the
    /// record's JSON: what [`to_message`](Self::to_message) gives for the
    /// decoded record, without building the record first. The relay does
    /// this for every command a saga sends.
    ///
    /// # Errors
    /// When the payload is not a command record.
    pub fn message_from(recorded: &RecordedEvent) -> Result<Message, serde_json::Error> {
        /// The record's fields, borrowed where the JSON allows it.
        #[derive(Deserialize)]
        struct Borrowed<'a> {
            #[serde(borrow)]
            topic: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            command_type: std::borrow::Cow<'a, str>,
            schema_version: u32,
            #[serde(borrow)]
            payload: &'a serde_json::value::RawValue,
        }
        let record: Borrowed<'_> = serde_json::from_str(recorded.payload.as_str())?;
        Ok(Message {
            message_id: recorded.event_id,
            topic: Arc::from(&*record.topic),
            message_type: Arc::from(&*record.command_type),
            schema_version: record.schema_version,
            payload: Payload::from_trusted_json(record.payload.get()),
            metadata: recorded.metadata.clone(),
            source: None,
        })
    }
}

/// Appends `s` as a JSON string: directly when nothing in it needs escaping
/// (topics and type names), else as `serde_json` writes it.
fn push_json_string(json: &mut String, s: &str) -> Result<(), CodecError> {
    let plain = s
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        json.push('"');
        json.push_str(s);
        json.push('"');
    } else {
        let quoted = serde_json::to_string(s).map_err(|source| CodecError::Encode {
            event_type: COMMAND_RECORD.into(),
            source,
        })?;
        json.push_str(&quoted);
    }
    Ok(())
}

/// The stored form of a deadline record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlineRecord {
    /// The deadline's name.
    pub name: String,
    /// When it is due (set records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::{Metadata, Position, StreamId};

    #[test]
    fn a_command_record_is_stored_as_its_serialize_writes_it() {
        let cases = [
            ("payment \"commands\"", "ChargeCard", 3),
            ("payment_commands", "ChargeCard", 0),
            ("back\\slash\ttab", "Caf\u{e9}", u32::MAX),
            ("", "\u{7f}", 10),
        ];
        for (topic, command_type, schema_version) in cases {
            let record = CommandRecord {
                topic: topic.into(),
                command_type: command_type.into(),
                schema_version,
                payload: Payload::from_json(r#"{"amount": "12.50", "card": ["tok_ok"]}"#).unwrap(),
            };
            let direct = record.to_payload().unwrap();
            assert_eq!(
                direct.as_str(),
                Payload::from_value(&record).unwrap().as_str()
            );
            assert_eq!(direct.decode::<CommandRecord>().unwrap(), record);
            // The relay's reading gives the message the record gives.
            let recorded = recorded_record(direct);
            assert_eq!(
                CommandRecord::message_from(&recorded).unwrap(),
                record.to_message(&recorded)
            );
        }
        let mut malformed = recorded_record(Payload::from_json(r#"{"topic": 1}"#).unwrap());
        assert!(CommandRecord::message_from(&malformed).is_err());
        malformed.payload = Payload::from_json(r#"{"topic": "t", "command_type": "C"}"#).unwrap();
        assert!(CommandRecord::message_from(&malformed).is_err());
    }

    fn recorded_record(payload: Payload) -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: StreamId::new("order_saga-1").unwrap(),
            stream_version: 2,
            position: Position::new(7, 0),
            event_type: COMMAND_RECORD.into(),
            schema_version: 1,
            payload,
            metadata: Metadata::new().with_correlation_id(Uuid::now_v7()),
            recorded_at: Utc::now(),
            tags: Default::default(),
        }
    }
}
