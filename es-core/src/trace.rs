//! The W3C trace context every event and message carries: parse and produce
//! `traceparent` values, so a trace follows an order across the store, the bus
//! and every service, without the OpenTelemetry stack.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A W3C trace context (`traceparent`, version `00`): trace id, parent span id
/// and flags.
///
/// It is `Copy` and holds no heap data: every event of an order carries it, and
/// events and messages are cloned on every hop. It is stored and sent as the
/// standard 55-character text form.
///
/// ```
/// use es_core::TraceParent;
/// let parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// let child = parent.child();
/// assert_eq!(child.trace_id(), parent.trace_id());
/// assert_ne!(child.span_id(), parent.span_id());
/// assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceParent {
    /// A context from its parts; `None` when the trace or span id is zero
    /// (which the standard forbids).
    pub fn from_parts(trace_id: u128, span_id: u64, flags: u8) -> Option<Self> {
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace (fresh trace id and span id), sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            flags: 1,
        }
    }

    /// A new trace with the given id (a fresh span id, sampled), for a
    /// system that names its traces after something of its own, such as an
    /// order id; `None` when `trace_id` is zero.
    pub fn root_with_trace_id(trace_id: u128) -> Option<Self> {
        Self::from_parts(trace_id, nonzero_u64(), 1)
    }

    /// A child span in the same trace: same trace id and flags, new span id.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: nonzero_u64(),
            flags: self.flags,
        }
    }

    /// A child of `parent` when there is one, else a new root.
    pub fn child_of(parent: Option<Self>) -> Self {
        parent.map_or_else(Self::new_root, |parent| parent.child())
    }

    /// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`); `None`
    /// when it is malformed or names the all-zero trace or span.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        if flags.len() != 2 || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version) || !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Self::from_parts(trace_id, span_id, flags)
    }

    /// The trace id, as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id, as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The trace id, span id and flags as numbers.
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) fn parts(&self) -> (u128, u64, u8) {
        (self.trace_id, self.span_id, self.flags)
    }
}

/// A `traceparent` value that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a W3C traceparent: {value:?}")]
pub struct InvalidTraceParent {
    /// The rejected value (cut to a readable length).
    pub value: String,
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| InvalidTraceParent {
            value: s.chars().take(64).collect(),
        })
    }
}

impl Serialize for TraceParent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceParent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// For [`Metadata`](crate::Metadata): a stored or received `traceparent` that
/// does not parse is dropped rather than failing the whole event (a trace is
/// lost, not the event).
pub(crate) fn lenient<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<TraceParent>, D::Error> {
    let text = Option::<std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    Ok(text.and_then(|t| TraceParent::parse(&t)))
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    #[test]
    fn parses_and_formats() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(s).unwrap();
        assert_eq!(t.to_string(), s);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn child_of_keeps_the_trace() {
        let root = TraceParent::new_root();
        let child = TraceParent::child_of(Some(root));
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        let orphan = TraceParent::child_of(None);
        assert_ne!(orphan.trace_id(), root.trace_id());
    }

    #[test]
    fn serializes_as_the_standard_text_and_parses_back() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t: TraceParent = s.parse().unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<TraceParent>(&json).unwrap(), t);
        assert!(serde_json::from_str::<TraceParent>("\"garbage\"").is_err());
        assert!("garbage".parse::<TraceParent>().is_err());
        assert_eq!(TraceParent::from_parts(0, 1, 1), None);
    }
}
