//! The schema of an application's events: the stored event types with their
//! stable names and current versions, and the upcasters that read their old
//! versions, checked together once, at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{DomainEvent, EventCodec, Upcaster, Upcasters};

/// A schema that cannot be read safely: found by [`SchemaBuilder::build`]
/// before anything is read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// Two event enums declare the same stored name: a reader of one would
    /// decode the other's events.
    #[error("event type {name} is declared by both {first} and {second}")]
    NameCollision {
        /// The stored name.
        name: String,
        /// The Rust type registered first.
        first: &'static str,
        /// The Rust type registered second.
        second: &'static str,
    },
    /// Two upcasters read the same stored type and version.
    #[error("two upcasters read {event_type} v{from_version}")]
    DuplicateUpcaster {
        /// The stored type name.
        event_type: String,
        /// The version both read.
        from_version: u32,
    },
    /// Following the upcasters from a stored type and version comes back to
    /// it.
    #[error("the upcasters from {event_type} v{from_version} lead back to it")]
    UpcasterCycle {
        /// The stored type name.
        event_type: String,
        /// The version the cycle passes.
        from_version: u32,
    },
    /// A chain ends at a version of a type that is not the one the code
    /// reads: an upcaster is missing in between.
    #[error("upcasting {event_type} v{from_version} stops at {end_type} v{end_version}, but the code reads {end_type} v{current}")]
    Gap {
        /// Where the chain starts.
        event_type: String,
        /// Its version.
        from_version: u32,
        /// The type the chain ends at.
        end_type: String,
        /// The version it ends at.
        end_version: u32,
        /// The version the code reads for `end_type`.
        current: u32,
    },
    /// A chain ends at a type no registered event enum declares.
    #[error("upcasting {event_type} v{from_version} ends at {end_type}, which no registered event enum declares")]
    UnknownTarget {
        /// Where the chain starts.
        event_type: String,
        /// Its version.
        from_version: u32,
        /// The undeclared type.
        end_type: String,
    },
    /// An upcaster reads the version the code writes: it would rewrite new
    /// events as they are read.
    #[error("an upcaster reads {event_type} v{version}, the version the code writes")]
    UpcastsCurrent {
        /// The stored type name.
        event_type: String,
        /// Its current version.
        version: u32,
    },
}

/// What the schema knows of one stored type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Declared {
    owner: &'static str,
    version: Option<u32>,
}

/// The event types an application stores and the upcasters that read their
/// old versions, checked at start-up; every reader decodes through a codec
/// from it ([`Schema::codec`]), so one registry serves every read path.
/// Cloning is cheap.
///
/// ```
/// use es_core::{DomainEvent, Schema, SchemaError, Upcaster};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[event(crate = "es_core")]
/// enum AccountEvent {
///     #[event(version = 2)]
///     Deposited { cents: u64 },
/// }
///
/// // Version 1 stored an amount in whole units.
/// let schema = Schema::builder()
///     .events::<AccountEvent>()
///     .upcaster(Upcaster::new("Deposited", 1, |v| {
///         let units = v["amount"].as_u64().ok_or("no amount")?;
///         Ok(serde_json::json!({ "cents": units * 100 }))
///     }))
///     .build()
///     .unwrap();
/// let old = es_core::Payload::from_json(r#"{"amount":3}"#).unwrap();
/// let event = schema.codec::<AccountEvent>().decode_parts("Deposited", 1, &old).unwrap();
/// assert_eq!(event, AccountEvent::Deposited { cents: 300 });
///
/// // A chain that stops short of the version the code reads is refused.
/// let gap = Schema::builder()
///     .events::<AccountEvent>()
///     .upcaster(Upcaster::new("Deposited", 0, Ok))
///     .build();
/// assert!(matches!(gap, Err(SchemaError::Gap { end_version: 1, current: 2, .. })));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Schema {
    types: Arc<BTreeMap<String, Declared>>,
    upcasters: Arc<Upcasters>,
}

impl Schema {
    /// Starts a schema.
    pub fn builder() -> SchemaBuilder {
        SchemaBuilder::default()
    }

    /// A codec for `E` that reads through this schema's upcasters.
    pub fn codec<E: DomainEvent>(&self) -> EventCodec<E> {
        EventCodec::sharing(Arc::clone(&self.upcasters))
    }

    /// The upcasters.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Every stored name an event of one of `types` may have been written
    /// under: the names themselves, and each older name whose upcaster
    /// chains lead to one of them (renamed, or split into it). Filters
    /// match stored names (`Projection::accepts`, a DCB query's types, a
    /// subscription's bindings): give them these, so that old events reach
    /// the readers of what they became.
    pub fn stored_names_of(&self, types: &[&str]) -> BTreeSet<String> {
        let mut names = self
            .upcasters
            .older_names(|ends| ends.iter().any(|(t, _)| types.contains(&t.as_str())));
        names.extend(types.iter().map(|t| (*t).to_owned()));
        names
    }

    /// Every registered stored type name with the version the code writes
    /// (`None` when its enum does not say), ordered by name.
    pub fn event_types(&self) -> impl Iterator<Item = (&str, Option<u32>)> {
        self.types
            .iter()
            .map(|(name, d)| (name.as_str(), d.version))
    }
}

/// Collects a [`Schema`]'s event types and upcasters; [`build`](Self::build)
/// checks them.
#[derive(Debug, Default)]
pub struct SchemaBuilder {
    types: Vec<(&'static str, &'static str, Option<u32>)>,
    upcasters: Vec<Upcaster>,
}

impl SchemaBuilder {
    /// Registers the stored types of the event enum `E` (its
    /// [`EVENT_TYPES`](DomainEvent::EVENT_TYPES), each with its
    /// [`known_version`](DomainEvent::known_version)). Register the enums
    /// the stores hold; enums that read the same names (a saga's inputs)
    /// decode through [`Schema::codec`] and need no registration.
    #[must_use]
    pub fn events<E: DomainEvent>(mut self) -> Self {
        let owner = std::any::type_name::<E>();
        for name in E::EVENT_TYPES {
            self.types.push((name, owner, E::known_version(name)));
        }
        self
    }

    /// Registers an upcaster.
    #[must_use]
    pub fn upcaster(mut self, upcaster: Upcaster) -> Self {
        self.upcasters.push(upcaster);
        self
    }

    /// Checks the schema: no stored name declared twice, at most one
    /// upcaster per `(type, version)`, no upcaster reading a version the
    /// code writes, and every chain ending, without a cycle, at a registered
    /// type in the version the code reads.
    pub fn build(self) -> Result<Schema, SchemaError> {
        let mut types = BTreeMap::new();
        for (name, owner, version) in self.types {
            match types.insert(name.to_owned(), Declared { owner, version }) {
                Some(first) if first.owner != owner => {
                    return Err(SchemaError::NameCollision {
                        name: name.to_owned(),
                        first: first.owner,
                        second: owner,
                    });
                }
                _ => {}
            }
        }
        let mut upcasters = Upcasters::new();
        for upcaster in self.upcasters {
            upcasters.register(upcaster)?;
        }
        for upcaster in upcasters.iter() {
            let (from_type, from_version) = (upcaster.event_type(), upcaster.from_version());
            if let Some(Declared {
                version: Some(current),
                ..
            }) = types.get(from_type)
            {
                if from_version >= *current {
                    return Err(SchemaError::UpcastsCurrent {
                        event_type: from_type.to_owned(),
                        version: from_version,
                    });
                }
            }
        }
        for upcaster in upcasters.iter() {
            let (from_type, from_version) = (upcaster.event_type(), upcaster.from_version());
            for (end_type, end_version) in upcasters.ends(from_type, from_version)? {
                match types.get(&end_type) {
                    None if !types.is_empty() => {
                        return Err(SchemaError::UnknownTarget {
                            event_type: from_type.to_owned(),
                            from_version,
                            end_type,
                        });
                    }
                    Some(Declared {
                        version: Some(current),
                        ..
                    }) if *current != end_version => {
                        return Err(SchemaError::Gap {
                            event_type: from_type.to_owned(),
                            from_version,
                            end_type,
                            end_version,
                            current: *current,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(Schema {
            types: Arc::new(types),
            upcasters: Arc::new(upcasters),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Upcast;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shipment {
        Packed { parcels: u32 },
        Left { at: String },
        Arrived { at: String },
    }

    impl DomainEvent for Shipment {
        const EVENT_TYPES: &'static [&'static str] = &["Packed", "Left", "Arrived"];
        fn event_type(&self) -> &'static str {
            match self {
                Self::Packed { .. } => "Packed",
                Self::Left { .. } => "Left",
                Self::Arrived { .. } => "Arrived",
            }
        }
        fn schema_version(&self) -> u32 {
            Self::known_version(self.event_type()).unwrap_or(1)
        }
        fn known_version(event_type: &str) -> Option<u32> {
            match event_type {
                "Packed" => Some(3),
                "Left" | "Arrived" => Some(1),
                _ => None,
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Other {
        Left { by: String },
    }

    impl DomainEvent for Other {
        const EVENT_TYPES: &'static [&'static str] = &["Left"];
        fn event_type(&self) -> &'static str {
            "Left"
        }
    }

    fn packed_chain() -> SchemaBuilder {
        Schema::builder()
            .events::<Shipment>()
            .upcaster(Upcaster::new("Packed", 1, Ok))
            .upcaster(Upcaster::new("Packed", 2, Ok))
    }

    #[test]
    fn a_complete_chain_builds() {
        let schema = packed_chain().build().unwrap();
        let names: Vec<_> = schema.event_types().collect();
        assert_eq!(
            names,
            [("Arrived", Some(1)), ("Left", Some(1)), ("Packed", Some(3))]
        );
    }

    #[test]
    fn two_enums_declaring_one_name_collide() {
        let err = Schema::builder()
            .events::<Shipment>()
            .events::<Other>()
            .build()
            .unwrap_err();
        assert!(
            matches!(err, SchemaError::NameCollision { ref name, .. } if name == "Left"),
            "{err}"
        );
    }

    #[test]
    fn an_enum_registered_twice_does_not_collide_with_itself() {
        Schema::builder()
            .events::<Shipment>()
            .events::<Shipment>()
            .build()
            .unwrap();
    }

    #[test]
    fn a_missing_step_is_a_gap() {
        let err = Schema::builder()
            .events::<Shipment>()
            .upcaster(Upcaster::new("Packed", 1, Ok))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            SchemaError::Gap {
                event_type: "Packed".into(),
                from_version: 1,
                end_type: "Packed".into(),
                end_version: 2,
                current: 3
            }
        );
    }

    #[test]
    fn duplicates_cycles_unknown_targets_and_current_versions_are_refused() {
        let duplicate = packed_chain().upcaster(Upcaster::drop("Packed", 2)).build();
        assert!(matches!(
            duplicate,
            Err(SchemaError::DuplicateUpcaster { .. })
        ));
        let cycle = Schema::builder()
            .events::<Shipment>()
            .upcaster(Upcaster::new("Moved", 1, Ok).renamed_to("Shifted"))
            .upcaster(Upcaster::split("Shifted", 2, [("Moved", 1)], |v| {
                Ok(vec![Upcast::new("Moved", 1, v)])
            }))
            .build();
        assert!(matches!(cycle, Err(SchemaError::UpcasterCycle { .. })));
        let unknown = Schema::builder()
            .events::<Shipment>()
            .upcaster(Upcaster::new("Moved", 1, Ok).renamed_to("Teleported"))
            .build();
        assert!(
            matches!(unknown, Err(SchemaError::UnknownTarget { ref end_type, .. }) if end_type == "Teleported")
        );
        let current = packed_chain()
            .upcaster(Upcaster::new("Packed", 3, Ok))
            .build();
        assert!(matches!(
            current,
            Err(SchemaError::UpcastsCurrent { version: 3, .. })
        ));
    }

    #[test]
    fn a_split_into_registered_types_and_a_drop_build() {
        let schema = packed_chain()
            .upcaster(Upcaster::split(
                "Moved",
                1,
                [("Left", 1), ("Arrived", 1)],
                |v| {
                    Ok(vec![
                        Upcast::new("Left", 1, serde_json::json!({ "at": v["from"] })),
                        Upcast::new("Arrived", 1, serde_json::json!({ "at": v["to"] })),
                    ])
                },
            ))
            .upcaster(Upcaster::drop("Weighed", 1))
            .build()
            .unwrap();
        let old = crate::Payload::from_json(r#"{"from":"a","to":"b"}"#).unwrap();
        let events: Vec<Shipment> = schema
            .codec::<Shipment>()
            .decode_parts_all("Moved", 1, &old)
            .unwrap()
            .collect();
        assert_eq!(
            events,
            [
                Shipment::Left { at: "a".into() },
                Shipment::Arrived { at: "b".into() }
            ]
        );
        let stored: Vec<_> = schema.stored_names_of(&["Left"]).into_iter().collect();
        assert_eq!(stored, ["Left", "Moved"]);
        let stored: Vec<_> = schema.stored_names_of(&["Packed"]).into_iter().collect();
        assert_eq!(stored, ["Packed"]);
        let dropped = schema
            .codec::<Shipment>()
            .decode_parts_all("Weighed", 1, &crate::Payload::from_json("{}").unwrap())
            .unwrap();
        assert_eq!(dropped.len(), 0);
    }
}
