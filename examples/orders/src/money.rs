//! Exact money: integer minor units (cents), written as decimal strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An amount of money in minor units (cents), never negative in this domain.
///
/// It is written and read as a decimal string with at most two fractional
/// digits: `"12.50"`, `"3"`, `"0.05"`. Arithmetic is checked, never rounded.
///
/// ```
/// use orders::Money;
/// let price: Money = "12.5".parse().unwrap();
/// assert_eq!(price.minor_units(), 1250);
/// assert_eq!(price.to_string(), "12.50");
/// assert_eq!(price.checked_mul(3).unwrap().to_string(), "37.50");
/// assert!("1.234".parse::<Money>().is_err());
/// assert!("-1".parse::<Money>().is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(u64);

/// A string was not a money amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount {input:?}: {reason}")]
pub struct ParseMoneyError {
    /// What was given.
    pub input: String,
    /// Why it was refused.
    pub reason: &'static str,
}

/// The largest amount accepted: ten trillion minor units.
const MAX_MINOR: u64 = 10_000_000_000_000;

impl Money {
    /// No money.
    pub const ZERO: Self = Self(0);

    /// An amount of `minor` minor units.
    pub const fn from_minor(minor: u64) -> Self {
        Self(minor)
    }

    /// The amount in minor units.
    pub const fn minor_units(self) -> u64 {
        self.0
    }

    /// `self * quantity`, or `None` past the largest amount accepted (an
    /// amount that could be written but never parsed back).
    pub fn checked_mul(self, quantity: u64) -> Option<Self> {
        self.0
            .checked_mul(quantity)
            .filter(|m| *m <= MAX_MINOR)
            .map(Self)
    }

    /// `self + other`, or `None` past the largest amount accepted.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0
            .checked_add(other.0)
            .filter(|m| *m <= MAX_MINOR)
            .map(Self)
    }

    /// `self + other`, saturating (for statistics).
    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    /// `self - other`, saturating at zero (for statistics).
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl FromStr for Money {
    type Err = ParseMoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseMoneyError {
            input: s.chars().take(40).collect(),
            reason,
        };
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(
                "expected a non-negative decimal such as \"12.50\" (digits, an optional point and at most two decimals)",
            ));
        }
        if s.contains('.') && frac.is_empty() {
            return Err(err("a decimal point must be followed by digits"));
        }
        if frac.len() > 2 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("at most two decimal digits are allowed"));
        }
        if whole.len() > 15 {
            return Err(err("the amount is too large"));
        }
        let whole: u64 = whole.parse().map_err(|_| err("the amount is too large"))?;
        let cents: u64 = match frac.len() {
            0 => 0,
            1 => u64::from(frac.as_bytes()[0] - b'0') * 10,
            _ => frac.parse().map_err(|_| err("invalid decimals"))?,
        };
        let minor = whole
            .checked_mul(100)
            .and_then(|w| w.checked_add(cents))
            .filter(|m| *m <= MAX_MINOR)
            .ok_or_else(|| err("the amount is too large"))?;
        Ok(Self(minor))
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
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
    fn parses_and_prints() {
        for (s, minor, back) in [
            ("0", 0, "0.00"),
            ("12.50", 1250, "12.50"),
            ("12.5", 1250, "12.50"),
            ("0.05", 5, "0.05"),
            ("007", 700, "7.00"),
        ] {
            let m: Money = s.parse().unwrap();
            assert_eq!(m.minor_units(), minor, "{s}");
            assert_eq!(m.to_string(), back);
        }
        for bad in [
            "",
            ".5",
            "1.",
            "1.234",
            "-1",
            "+1",
            "1e3",
            "abc",
            "1.2.3",
            " 1",
            "99999999999999999",
        ] {
            assert!(bad.parse::<Money>().is_err(), "{bad:?} parsed");
        }
    }

    /// Whatever arithmetic gives back parses back: an order total is
    /// written to the store as a string and read again by every consumer.
    #[test]
    fn arithmetic_stays_within_what_parses() {
        let max = Money::from_minor(MAX_MINOR);
        assert_eq!(max.checked_mul(1), Some(max));
        assert_eq!(max.checked_mul(2), None);
        assert_eq!(max.checked_add(Money::from_minor(1)), None);
        assert_eq!(max.to_string().parse::<Money>(), Ok(max));
    }

    proptest! {
        #[test]
        fn round_trips(minor in 0u64..MAX_MINOR) {
            let m = Money::from_minor(minor);
            prop_assert_eq!(m.to_string().parse::<Money>().unwrap(), m);
        }
    }
}
