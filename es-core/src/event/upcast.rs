//! Upcasters: old stored payloads read as the current schema.
//!
//! An [`Upcaster`] takes one stored `(type, version)` to the next shape: the
//! same type one version later (a reshape), another type name (a rename), or
//! any number of events (a split, or a drop when none). [`Upcasters`] holds
//! them, at most one per `(type, version)`, and runs the chains on every
//! read; [`Schema`](super::Schema) checks the chains against the event types
//! the code reads before anything is read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use super::{CodecError, SchemaError};
use crate::Payload;

type Reshape = dyn Fn(Value) -> Result<Value, String> + Send + Sync;
type Split = dyn Fn(Value) -> Result<Vec<Upcast>, String> + Send + Sync;

/// One event an upcaster produced: its type name, the schema version its
/// payload is in, and the payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Upcast {
    /// The type name.
    pub event_type: String,
    /// The schema version of `payload`.
    pub schema_version: u32,
    /// The payload.
    pub payload: Value,
}

impl Upcast {
    /// An event of `event_type` at `schema_version` with `payload`.
    pub fn new(event_type: impl Into<String>, schema_version: u32, payload: Value) -> Self {
        Self {
            event_type: event_type.into(),
            schema_version,
            payload,
        }
    }
}

#[derive(Clone)]
enum Step {
    /// One event in, one out: the same type one version later, or the type
    /// it is renamed to.
    Reshape {
        renamed_to: Option<String>,
        transform: Arc<Reshape>,
    },
    /// One event in, any of the declared outputs out (none drops it).
    Split {
        outputs: Vec<(String, u32)>,
        transform: Arc<Split>,
    },
}

/// Turns the payload of one stored event type and schema version into the
/// next shape, so old history is read as current events without ever being
/// rewritten.
///
/// The stream versions of the events a read returns always come from
/// storage: an upcaster that drops or splits events changes what a reader
/// folds, never the version the next append expects.
#[derive(Clone)]
pub struct Upcaster {
    event_type: String,
    from_version: u32,
    step: Step,
}

impl fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcaster")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("outputs", &self.outputs().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Upcaster {
    /// An upcaster from `event_type` at `from_version` to `from_version + 1`.
    pub fn new(
        event_type: impl Into<String>,
        from_version: u32,
        transform: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            event_type: event_type.into(),
            from_version,
            step: Step::Reshape {
                renamed_to: None,
                transform: Arc::new(transform),
            },
        }
    }

    /// An upcaster that turns one `event_type` at `from_version` into any
    /// number of events, each of a type and version among `outputs`. The
    /// outputs are declared so that [`Schema`](super::Schema) can check where
    /// every chain ends; producing an undeclared one is a
    /// [`CodecError::Upcast`].
    pub fn split<T: Into<String>>(
        event_type: impl Into<String>,
        from_version: u32,
        outputs: impl IntoIterator<Item = (T, u32)>,
        transform: impl Fn(Value) -> Result<Vec<Upcast>, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            event_type: event_type.into(),
            from_version,
            step: Step::Split {
                outputs: outputs.into_iter().map(|(t, v)| (t.into(), v)).collect(),
                transform: Arc::new(transform),
            },
        }
    }

    /// An upcaster that drops every `event_type` at `from_version`: readers
    /// no longer see it, and the stream keeps its version.
    pub fn drop(event_type: impl Into<String>, from_version: u32) -> Self {
        Self::split(
            event_type,
            from_version,
            Vec::<(String, u32)>::new(),
            |_| Ok(Vec::new()),
        )
    }

    /// Also renames the type: the upcast payload is read as `new_type` at
    /// `from_version + 1`. Only a reshape ([`Upcaster::new`]) is renamed
    /// this way; a split names the type of each event it makes.
    #[must_use]
    pub fn renamed_to(mut self, new_type: impl Into<String>) -> Self {
        if let Step::Reshape { renamed_to, .. } = &mut self.step {
            *renamed_to = Some(new_type.into());
        }
        self
    }

    /// The type name it reads.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The version it reads.
    pub fn from_version(&self) -> u32 {
        self.from_version
    }

    /// The `(type, version)`s it may produce.
    pub fn outputs(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        let (reshaped, split) = match &self.step {
            Step::Reshape { renamed_to, .. } => (
                Some((
                    renamed_to.as_deref().unwrap_or(&self.event_type),
                    self.from_version + 1,
                )),
                &[][..],
            ),
            Step::Split { outputs, .. } => (None, outputs.as_slice()),
        };
        reshaped
            .into_iter()
            .chain(split.iter().map(|(t, v)| (t.as_str(), *v)))
    }

    fn apply(&self, value: Value) -> Result<Vec<Upcast>, CodecError> {
        let refused = |reason: String| CodecError::Upcast {
            event_type: self.event_type.clone(),
            from_version: self.from_version,
            reason,
        };
        match &self.step {
            Step::Reshape {
                renamed_to,
                transform,
            } => {
                let payload = transform(value).map_err(refused)?;
                let event_type = renamed_to
                    .clone()
                    .unwrap_or_else(|| self.event_type.clone());
                Ok(vec![Upcast::new(
                    event_type,
                    self.from_version + 1,
                    payload,
                )])
            }
            Step::Split { outputs, transform } => {
                let events = transform(value).map_err(refused)?;
                for event in &events {
                    let declared = outputs
                        .iter()
                        .any(|(t, v)| *t == event.event_type && *v == event.schema_version);
                    if !declared {
                        return Err(refused(format!(
                            "produced {} v{}, which it does not declare",
                            event.event_type, event.schema_version
                        )));
                    }
                }
                Ok(events)
            }
        }
    }
}

/// The registry of upcasters every read path decodes through: at most one
/// per stored `(type, version)`.
#[derive(Clone, Debug, Default)]
pub struct Upcasters {
    /// By type name, then by the version each reads.
    by_type: HashMap<String, BTreeMap<u32, Upcaster>>,
    len: usize,
}

impl Upcasters {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an upcaster; a second one for the same type and version is
    /// [`SchemaError::DuplicateUpcaster`].
    pub fn register(&mut self, upcaster: Upcaster) -> Result<(), SchemaError> {
        let versions = self.by_type.entry(upcaster.event_type.clone()).or_default();
        if versions.contains_key(&upcaster.from_version) {
            return Err(SchemaError::DuplicateUpcaster {
                event_type: upcaster.event_type,
                from_version: upcaster.from_version,
            });
        }
        versions.insert(upcaster.from_version, upcaster);
        self.len += 1;
        Ok(())
    }

    /// This registry with `upcaster` registered (see
    /// [`register`](Self::register)).
    pub fn with(mut self, upcaster: Upcaster) -> Result<Self, SchemaError> {
        self.register(upcaster)?;
        Ok(self)
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The upcaster registered for `event_type` at `version`.
    pub fn get(&self, event_type: &str, version: u32) -> Option<&Upcaster> {
        self.by_type.get(event_type)?.get(&version)
    }

    /// Every registered upcaster, ordered by type and version.
    pub fn iter(&self) -> impl Iterator<Item = &Upcaster> {
        let mut types: Vec<_> = self.by_type.iter().collect();
        types.sort_by(|a, b| a.0.cmp(b.0));
        types
            .into_iter()
            .flat_map(|(_, versions)| versions.values())
    }

    /// Where the chains starting at `event_type` v`version` end: every
    /// `(type, version)` no upcaster reads that they reach.
    /// [`SchemaError::UpcasterCycle`] when a chain comes back to a
    /// `(type, version)` it passed.
    pub fn ends(
        &self,
        event_type: &str,
        version: u32,
    ) -> Result<BTreeSet<(String, u32)>, SchemaError> {
        let mut ends = BTreeSet::new();
        let mut path = Vec::new();
        self.walk(event_type, version, &mut path, &mut ends)?;
        Ok(ends)
    }

    /// The stored names upcasters read whose chains, run to their ends,
    /// satisfy `reads_as` (given every `(type, version)` the chains of one
    /// upcaster end at; a chain with a cycle satisfies nothing).
    pub fn older_names(
        &self,
        reads_as: impl Fn(&BTreeSet<(String, u32)>) -> bool,
    ) -> BTreeSet<String> {
        self.iter()
            .filter(|u| {
                self.ends(u.event_type(), u.from_version())
                    .is_ok_and(|ends| reads_as(&ends))
            })
            .map(|u| u.event_type().to_owned())
            .collect()
    }

    fn walk(
        &self,
        event_type: &str,
        version: u32,
        path: &mut Vec<(String, u32)>,
        ends: &mut BTreeSet<(String, u32)>,
    ) -> Result<(), SchemaError> {
        let Some(upcaster) = self.get(event_type, version) else {
            ends.insert((event_type.to_owned(), version));
            return Ok(());
        };
        if path.iter().any(|(t, v)| t == event_type && *v == version) {
            return Err(SchemaError::UpcasterCycle {
                event_type: event_type.to_owned(),
                from_version: version,
            });
        }
        path.push((event_type.to_owned(), version));
        for (t, v) in upcaster.outputs() {
            self.walk(t, v, path, ends)?;
        }
        path.pop();
        Ok(())
    }

    /// Runs every chain that applies and returns the events the stored one
    /// reads as (none when it was dropped), or `None` when no upcaster reads
    /// its type and version.
    pub fn upcast(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<Option<Vec<Upcast>>, CodecError> {
        if self.get(event_type, schema_version).is_none() {
            return Ok(None);
        }
        let value = payload.to_value().map_err(|e| CodecError::Upcast {
            event_type: event_type.to_owned(),
            from_version: schema_version,
            reason: e.to_string(),
        })?;
        let mut out = Vec::new();
        self.expand(Upcast::new(event_type, schema_version, value), 0, &mut out)?;
        Ok(Some(out))
    }

    /// Upcasts `event` as far as the chains go, appending the results to
    /// `out` in order. A chain longer than the registry is a cycle (a
    /// registry [`Schema`](super::Schema) did not check).
    fn expand(&self, event: Upcast, depth: usize, out: &mut Vec<Upcast>) -> Result<(), CodecError> {
        let Some(upcaster) = self.get(&event.event_type, event.schema_version) else {
            out.push(event);
            return Ok(());
        };
        if depth > self.len {
            return Err(CodecError::Upcast {
                event_type: event.event_type,
                from_version: event.schema_version,
                reason: "the upcasters form a cycle".into(),
            });
        }
        for next in upcaster.apply(event.payload)? {
            self.expand(next, depth + 1, out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(json: &Value) -> Payload {
        Payload::from_value(json).unwrap()
    }

    #[test]
    fn a_split_reads_one_event_as_several_in_order_each_upcast_further() {
        let up = Upcasters::new()
            .with(Upcaster::split(
                "Moved",
                1,
                [("Left", 1), ("Arrived", 1)],
                |v| {
                    Ok(vec![
                        Upcast::new("Left", 1, json!({ "at": v["from"] })),
                        Upcast::new("Arrived", 1, json!({ "at": v["to"] })),
                    ])
                },
            ))
            .unwrap()
            .with(Upcaster::new("Arrived", 1, |v| {
                Ok(json!({ "place": v["at"] }))
            }))
            .unwrap();
        let out = up
            .upcast("Moved", 1, &payload(&json!({ "from": "a", "to": "b" })))
            .unwrap()
            .unwrap();
        assert_eq!(
            out,
            [
                Upcast::new("Left", 1, json!({ "at": "a" })),
                Upcast::new("Arrived", 2, json!({ "place": "b" }))
            ]
        );
    }

    #[test]
    fn a_drop_reads_as_nothing_and_other_versions_are_untouched() {
        let up = Upcasters::new().with(Upcaster::drop("Noise", 1)).unwrap();
        assert_eq!(
            up.upcast("Noise", 1, &payload(&json!({}))).unwrap(),
            Some(vec![])
        );
        assert_eq!(up.upcast("Noise", 2, &payload(&json!({}))).unwrap(), None);
    }

    #[test]
    fn an_undeclared_output_is_refused() {
        let up = Upcasters::new()
            .with(Upcaster::split("A", 1, [("B", 1)], |v| {
                Ok(vec![Upcast::new("C", 1, v)])
            }))
            .unwrap();
        let err = up.upcast("A", 1, &payload(&json!(1))).unwrap_err();
        assert!(
            matches!(err, CodecError::Upcast { ref reason, .. } if reason.contains("C v1")),
            "{err}"
        );
    }

    #[test]
    fn a_second_upcaster_for_one_version_is_refused() {
        let err = Upcasters::new()
            .with(Upcaster::new("A", 1, Ok))
            .unwrap()
            .with(Upcaster::drop("A", 1))
            .unwrap_err();
        assert_eq!(
            err,
            SchemaError::DuplicateUpcaster {
                event_type: "A".into(),
                from_version: 1
            }
        );
    }

    #[test]
    fn a_cycle_is_found_by_ends_and_bounded_when_upcasting() {
        // A v1 -> B v1 -> A v1.
        let up = Upcasters::new()
            .with(Upcaster::new("A", 1, Ok).renamed_to("B"))
            .unwrap()
            .with(Upcaster::split("B", 2, [("A", 1)], |v| {
                Ok(vec![Upcast::new("A", 1, v)])
            }))
            .unwrap();
        assert_eq!(
            up.ends("A", 1).unwrap_err(),
            SchemaError::UpcasterCycle {
                event_type: "A".into(),
                from_version: 1
            }
        );
        let err = up.upcast("A", 1, &payload(&json!(1))).unwrap_err();
        assert!(
            matches!(err, CodecError::Upcast { ref reason, .. } if reason.contains("cycle")),
            "{err}"
        );
    }

    #[test]
    fn ends_follow_every_branch() {
        let up = Upcasters::new()
            .with(Upcaster::split("A", 1, [("B", 1), ("C", 3)], |_| {
                Ok(vec![])
            }))
            .unwrap()
            .with(Upcaster::new("B", 1, Ok))
            .unwrap();
        let ends: Vec<_> = up.ends("A", 1).unwrap().into_iter().collect();
        assert_eq!(ends, [("B".to_owned(), 2), ("C".to_owned(), 3)]);
    }
}
