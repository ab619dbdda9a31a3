//! [`Tag`]: a `kind:value` label on an event, what DCB queries select by.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 256;

/// A label on an event naming an entity the event is about, as
/// `"<kind>:<value>"`: `"coupon:SPRING"`, `"customer:42"`,
/// `"username:ada"`. A [`Query`](crate::dcb::Query) selects events by their
/// type and tags, and a conditional append fails when an event with matching
/// tags was recorded after the read it decided on.
///
/// A tag is valid when its kind (before the first `:`) and its value (after
/// it) are both non-empty, it holds no control character, and it is at most
/// [`MAX_TAG_LEN`] bytes long.
///
/// ```
/// use es_core::Tag;
/// let tag = Tag::of("coupon", "SPRING").unwrap();
/// assert_eq!(tag.as_str(), "coupon:SPRING");
/// assert_eq!((tag.kind(), tag.value()), ("coupon", "SPRING"));
/// assert_eq!("coupon:SPRING".parse::<Tag>().unwrap(), tag);
/// assert!(Tag::new("no-kind").is_err());
/// assert!(Tag::of("a:b", "c").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(Arc<str>);

/// A string that is not a valid [`Tag`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tag {tag:?}: {reason}")]
pub struct InvalidTag {
    /// What was given.
    pub tag: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Tag {
    /// A tag from its string form `"<kind>:<value>"`.
    pub fn new(tag: impl Into<Arc<str>>) -> Result<Self, InvalidTag> {
        let tag: Arc<str> = tag.into();
        let invalid = |reason| InvalidTag {
            tag: tag.to_string(),
            reason,
        };
        if tag.len() > MAX_TAG_LEN {
            return Err(invalid("longer than 256 bytes"));
        }
        if tag.chars().any(char::is_control) {
            return Err(invalid("it holds a control character"));
        }
        match tag.split_once(':') {
            None => Err(invalid("expected \"<kind>:<value>\"")),
            Some(("", _)) => Err(invalid("the kind is empty")),
            Some((_, "")) => Err(invalid("the value is empty")),
            Some(_) => Ok(Self(tag)),
        }
    }

    /// The tag `"<kind>:<value>"`; `kind` must not contain `:`.
    pub fn of(kind: &str, value: impl fmt::Display) -> Result<Self, InvalidTag> {
        if kind.contains(':') {
            return Err(InvalidTag {
                tag: format!("{kind}:{value}"),
                reason: "the kind contains ':'",
            });
        }
        Self::new(format!("{kind}:{value}"))
    }

    /// The string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`.
    pub fn kind(&self) -> &str {
        self.0.split_once(':').map_or("", |(kind, _)| kind)
    }

    /// The part after the first `:`.
    pub fn value(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, value)| value)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for Tag {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Tag {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = InvalidTag;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Tag {
    type Error = InvalidTag;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for Tag {
    type Error = InvalidTag;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl Serialize for Tag {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(s.as_ref()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_the_kind_value_form() {
        for good in ["a:b", "coupon:SPRING-1", "k:v:w", "user:ädä"] {
            let tag = Tag::new(good).unwrap();
            assert_eq!(tag.as_str(), good);
        }
        assert_eq!(Tag::new("k:v:w").unwrap().value(), "v:w");
        for bad in ["", "ab", ":b", "a:", "a:b\0", "a:\nb"] {
            assert!(Tag::new(bad).is_err(), "{bad:?}");
        }
        assert!(Tag::new(format!("a:{}", "x".repeat(MAX_TAG_LEN))).is_err());
    }

    #[test]
    fn serde_uses_the_string_form_and_validates() {
        let tag = Tag::of("user", 7).unwrap();
        assert_eq!(serde_json::to_string(&tag).unwrap(), "\"user:7\"");
        assert_eq!(serde_json::from_str::<Tag>("\"user:7\"").unwrap(), tag);
        assert!(serde_json::from_str::<Tag>("\"user\"").is_err());
    }
}
