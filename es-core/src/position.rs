//! The global position of an event in the store's log.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an event stands in the store's global log.
///
/// A position is opaque: compare positions, store them as checkpoints, pass their
/// string form around, but do not do arithmetic on them. It is a pair so that a
/// backend can order its log by more than one number: the PostgreSQL store uses
/// (transaction id, sequence), which is what makes it gap-safe, while the
/// in-memory store uses (sequence, 0).
///
/// Positions are totally ordered. [`Position::START`] is before every event:
/// reading "after `START`" reads the whole log.
///
/// The string form is `"<major>.<minor>"` and round-trips through [`FromStr`]:
///
/// ```
/// use es_core::Position;
/// let p = Position::new(812, 3);
/// assert_eq!(p.to_string(), "812.3");
/// assert_eq!("812.3".parse::<Position>().unwrap(), p);
/// assert!(Position::START < p);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    major: u64,
    minor: u64,
}

impl Position {
    /// Before the first event of any log.
    pub const START: Self = Self { major: 0, minor: 0 };

    /// A position from its two parts, as a backend defines them.
    pub const fn new(major: u64, minor: u64) -> Self {
        Self { major, minor }
    }

    /// The most significant part (a transaction id, or a sequence).
    pub const fn major(self) -> u64 {
        self.major
    }

    /// The least significant part.
    pub const fn minor(self) -> u64 {
        self.minor
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The string was not a position's string form (`"<major>.<minor>"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {input:?}: expected \"<major>.<minor>\", two unsigned integers")]
pub struct ParsePositionError {
    /// What was given.
    pub input: String,
}

impl FromStr for Position {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError {
            input: s.to_owned(),
        };
        let (major, minor) = s.split_once('.').ok_or_else(err)?;
        let parse = |part: &str| {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            part.parse::<u64>().map_err(|_| err())
        };
        Ok(Self::new(parse(major)?, parse(minor)?))
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_malformed_strings() {
        for bad in ["", "1", "1.", ".1", "a.b", "1.2.3", "-1.2", "1 .2", "+1.2"] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let p = Position::new(7, 42);
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"7.42\"");
        assert_eq!(serde_json::from_str::<Position>("\"7.42\"").unwrap(), p);
    }

    proptest! {
        #[test]
        fn string_form_round_trips_and_keeps_order(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            let (pa, pb) = (Position::new(a.0, a.1), Position::new(b.0, b.1));
            prop_assert_eq!(pa.to_string().parse::<Position>().unwrap(), pa);
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
        }
    }
}
