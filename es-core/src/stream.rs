//! Stream identity and the optimistic-concurrency expectation of an append.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The longest stream id a store accepts, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 200;

/// The name of one stream of events, such as `order-3f2a…`.
///
/// A stream id is non-empty, at most [`MAX_STREAM_ID_LEN`] bytes, and holds no
/// control characters. By convention it is `<category>-<id>`; the category (the
/// part before the first `-`) names the aggregate type or bounded context and is
/// what relays and projections route by. Cloning is cheap.
///
/// ```
/// use es_core::StreamId;
/// let id = StreamId::new("order-42").unwrap();
/// assert_eq!(id.category(), "order");
/// assert!(StreamId::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

/// A stream id was empty, too long, or held control characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream id {id:?}: {reason}")]
pub struct InvalidStreamId {
    /// The rejected id (cut to a readable length).
    pub id: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

impl StreamId {
    /// Checks and wraps a stream id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidStreamId> {
        let id = id.as_ref();
        let reject = |reason| InvalidStreamId {
            id: id.chars().take(64).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(reject("it is empty"));
        }
        if id.len() > MAX_STREAM_ID_LEN {
            return Err(reject("it is longer than 200 bytes"));
        }
        if id.chars().any(char::is_control) {
            return Err(reject("it holds control characters"));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The stream of one aggregate: `<category>-<id>`.
    pub fn for_aggregate(category: &str, id: impl fmt::Display) -> Result<Self, InvalidStreamId> {
        use fmt::Write;
        // Every command and saga reaction names its stream: the name is
        // written on the stack, and only the shared string is allocated.
        let mut name = NameBuffer::default();
        write!(name, "{category}-{id}").map_err(|_| InvalidStreamId {
            id: category.chars().take(64).collect(),
            reason: "it does not format within 200 bytes",
        })?;
        Self::new(name.as_str())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `-`, or the whole id when there is none.
    pub fn category(&self) -> &str {
        self.0
            .split_once('-')
            .map_or(&self.0, |(category, _)| category)
    }

    /// The part after the first `-`, or the whole id when there is none.
    pub fn entity_id(&self) -> &str {
        self.0.split_once('-').map_or(&self.0, |(_, id)| id)
    }
}

/// A stream id being formatted: room for the longest valid one, on the stack.
struct NameBuffer {
    bytes: [u8; MAX_STREAM_ID_LEN],
    len: usize,
}

impl Default for NameBuffer {
    fn default() -> Self {
        Self {
            bytes: [0; MAX_STREAM_ID_LEN],
            len: 0,
        }
    }
}

impl NameBuffer {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in, so this never fails.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for NameBuffer {
    /// Fails once the name would pass [`MAX_STREAM_ID_LEN`].
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// What the writer believes about a stream's current version when it appends.
///
/// Stream versions count events: the first event of a stream has version 1, and a
/// stream's version is the version of its last event (0 when it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check: append whatever the stream's state.
    Any,
    /// The stream must not exist yet (have no events).
    NoStream,
    /// The stream must exist (have at least one event).
    StreamExists,
    /// The stream's last event must have exactly this version. `Exact(0)` means
    /// the same as [`ExpectedVersion::NoStream`].
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose current version is `actual` (0 for no stream)
    /// satisfies this expectation.
    pub fn is_satisfied_by(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::StreamExists => actual > 0,
            Self::Exact(v) => v == actual,
        }
    }

    /// The expectation for a stream loaded at `version` (0 for none).
    pub fn from_loaded(version: u64) -> Self {
        if version == 0 {
            Self::NoStream
        } else {
            Self::Exact(version)
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("stream exists"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_ids() {
        assert!(StreamId::new("a").is_ok());
        assert!(StreamId::new("x".repeat(MAX_STREAM_ID_LEN)).is_ok());
        assert!(StreamId::new("x".repeat(MAX_STREAM_ID_LEN + 1)).is_err());
        assert!(StreamId::new("a\nb").is_err());
        assert!(StreamId::new("a\u{7f}b").is_err());
        // Non-ASCII ids: with a C1 control character, and without.
        assert!(StreamId::new("caf\u{e9}-\u{85}").is_err());
        assert!(StreamId::new("caf\u{e9}-1").is_ok());
        assert_eq!(StreamId::new("").unwrap_err().reason, "it is empty");
    }

    #[test]
    fn names_an_aggregate_stream_up_to_the_longest_id() {
        let id = uuid::Uuid::now_v7();
        let stream = StreamId::for_aggregate("order", id).unwrap();
        assert_eq!(stream.as_str(), format!("order-{id}"));
        let longest = "x".repeat(MAX_STREAM_ID_LEN - 2);
        assert_eq!(
            StreamId::for_aggregate("c", &longest)
                .unwrap()
                .as_str()
                .len(),
            200
        );
        let error = StreamId::for_aggregate("c", format!("{longest}x")).unwrap_err();
        assert_eq!(error.reason, "it does not format within 200 bytes");
        assert!(StreamId::for_aggregate("", 1).is_ok());
        assert!(StreamId::for_aggregate("c\n", 1).is_err());
    }

    #[test]
    fn splits_category_and_entity() {
        let id = StreamId::new("order-1-2").unwrap();
        assert_eq!((id.category(), id.entity_id()), ("order", "1-2"));
        let plain = StreamId::new("ledger").unwrap();
        assert_eq!((plain.category(), plain.entity_id()), ("ledger", "ledger"));
    }

    #[test]
    fn expectations() {
        use ExpectedVersion::*;
        assert!(Any.is_satisfied_by(0) && Any.is_satisfied_by(9));
        assert!(NoStream.is_satisfied_by(0) && !NoStream.is_satisfied_by(1));
        assert!(!StreamExists.is_satisfied_by(0) && StreamExists.is_satisfied_by(1));
        assert!(Exact(0).is_satisfied_by(0) && Exact(3).is_satisfied_by(3));
        assert!(!Exact(3).is_satisfied_by(2));
        assert_eq!(ExpectedVersion::from_loaded(0), NoStream);
        assert_eq!(ExpectedVersion::from_loaded(4), Exact(4));
    }
}
