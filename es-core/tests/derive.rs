//! `#[derive(DomainEvent)]` names each variant as serde does: the derived
//! `event_type()` is the key serde writes, for every rename rule, and the
//! codec (which checks the two agree) round-trips every variant.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use es_core::{DomainEvent, EventCodec, Metadata};
use serde::{Deserialize, Serialize};

/// The key serde writes for an externally tagged variant (or the string of
/// a unit variant).
fn serde_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::String(name) => name,
        serde_json::Value::Object(map) => map.keys().next().unwrap().clone(),
        other => panic!("not an externally tagged variant: {other}"),
    }
}

fn check<E: DomainEvent + Clone + PartialEq + std::fmt::Debug>(events: &[E], types: &[&str]) {
    let codec = EventCodec::<E>::new();
    let names: Vec<String> = events.iter().map(serde_name).collect();
    assert_eq!(names, types, "EVENT_TYPES against serde");
    for event in events {
        assert_eq!(event.event_type(), serde_name(event));
        let new = codec.encode(event, Metadata::new()).unwrap();
        let back = codec
            .decode_parts(&new.event_type, new.schema_version, &new.payload)
            .unwrap();
        assert_eq!(&back, event);
    }
}

macro_rules! rule {
    ($name:ident, $rule:literal) => {
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
        #[serde(rename_all = $rule)]
        enum $name {
            Opened {
                owner: String,
            },
            VeryTastyHTTPThing(u8),
            Z42,
            #[serde(rename = "kept-as-is")]
            Renamed {
                a: u8,
            },
        }

        impl $name {
            fn all() -> Vec<Self> {
                vec![
                    Self::Opened { owner: "o".into() },
                    Self::VeryTastyHTTPThing(1),
                    Self::Z42,
                    Self::Renamed { a: 2 },
                ]
            }
        }
    };
}

rule!(Lower, "lowercase");
rule!(Upper, "UPPERCASE");
rule!(Pascal, "PascalCase");
rule!(Camel, "camelCase");
rule!(Snake, "snake_case");
rule!(ScreamingSnake, "SCREAMING_SNAKE_CASE");
rule!(Kebab, "kebab-case");
rule!(ScreamingKebab, "SCREAMING-KEBAB-CASE");

#[test]
fn derived_names_are_serdes_under_every_rule() {
    check(&Lower::all(), Lower::EVENT_TYPES);
    check(&Upper::all(), Upper::EVENT_TYPES);
    check(&Pascal::all(), Pascal::EVENT_TYPES);
    check(&Camel::all(), Camel::EVENT_TYPES);
    check(&Snake::all(), Snake::EVENT_TYPES);
    check(&ScreamingSnake::all(), ScreamingSnake::EVENT_TYPES);
    check(&Kebab::all(), Kebab::EVENT_TYPES);
    check(&ScreamingKebab::all(), ScreamingKebab::EVENT_TYPES);
    assert_eq!(
        Snake::EVENT_TYPES,
        ["opened", "very_tasty_h_t_t_p_thing", "z42", "kept-as-is"]
    );
}

/// Versions: the enum's for every variant, a variant's own where given,
/// 1 when neither; a serialize-only rename names the stored type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(version = 2)]
enum Versioned {
    Old,
    #[event(version = 7)]
    New {
        x: u32,
    },
    #[serde(rename(serialize = "Written", deserialize = "Written"))]
    Both,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum Plain {
    Only,
}

#[test]
fn versions_and_serialize_renames() {
    assert_eq!(Versioned::Old.schema_version(), 2);
    assert_eq!(Versioned::New { x: 1 }.schema_version(), 7);
    assert_eq!(Versioned::Both.event_type(), "Written");
    assert_eq!(Plain::Only.schema_version(), 1);
    check(
        &[Versioned::Old, Versioned::New { x: 1 }, Versioned::Both],
        Versioned::EVENT_TYPES,
    );
}

/// The derive knows the version it writes for each type name; the codec
/// refuses a stored event of a later version (written by newer code) as
/// `UnknownSchemaVersion`, and still reads the versions it knows.
#[test]
fn a_later_schema_version_is_refused_as_unknown() {
    assert_eq!(Versioned::known_version("Old"), Some(2));
    assert_eq!(Versioned::known_version("New"), Some(7));
    assert_eq!(Versioned::known_version("Written"), Some(2));
    assert_eq!(Versioned::known_version("Nope"), None);
    let codec = EventCodec::<Versioned>::new();
    let new = codec
        .encode(&Versioned::New { x: 3 }, Metadata::new())
        .unwrap();
    let newer = codec.decode_parts("New", 8, &new.payload);
    assert!(
        matches!(
            newer,
            Err(es_core::CodecError::UnknownSchemaVersion { ref event_type, version: 8, known: 7 })
                if event_type == "New"
        ),
        "{newer:?}"
    );
    for known in [7, 6] {
        let read = codec.decode_parts("New", known, &new.payload).unwrap();
        assert_eq!(read, Versioned::New { x: 3 });
    }
}
