//! A golden corpus: one stored sample of every event type and schema version
//! ever released, decoded by today's code in every test run.
//!
//! The corpus of an event enum is a directory holding, for each
//! `(type, version)`, a file `<type>.v<version>.json` with the payload as it
//! was stored. [`GoldenCorpus::check`] decodes every file through the codec
//! (and so through the upcasters), and requires a sample of every type the
//! enum writes at the version it writes today. A missing one is written from
//! the given current events when `ES_GOLDEN_RECORD` is set, and is an error
//! otherwise. Files are never rewritten: a sample that no longer decodes is
//! a release that would not read its own history.
//!
//! ```
//! use es_core::testing::GoldenCorpus;
//! use es_core::{DomainEvent, EventCodec};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, DomainEvent)]
//! #[event(crate = "es_core")]
//! enum Light {
//!     #[event(version = 2)]
//!     Switched { on: bool },
//! }
//!
//! let dir = std::env::temp_dir().join(format!("golden-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! // Released earlier: version 1, with no upcaster, no longer decodes.
//! std::fs::write(dir.join("Switched.v1.json"), r#"{"state":"on"}"#).unwrap();
//! std::fs::write(dir.join("Switched.v2.json"), r#"{"on":true}"#).unwrap();
//! let corpus = GoldenCorpus::at(&dir);
//! let current = [Light::Switched { on: true }];
//! assert!(corpus.check(&EventCodec::<Light>::new(), &current).is_err());
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::{CodecError, DomainEvent, EventCodec, Metadata, Payload};

/// The environment variable that lets [`GoldenCorpus::check`] write the
/// samples it misses.
pub const RECORD_VAR: &str = "ES_GOLDEN_RECORD";

/// What a check of a golden corpus found wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GoldenError {
    /// The corpus could not be read or written.
    #[error("golden corpus {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not named `<type>.v<version>.json`, or does not hold JSON.
    #[error("golden corpus file {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A released sample no longer decodes.
    #[error("golden sample {path} no longer decodes: {source}")]
    Undecodable {
        /// The file.
        path: PathBuf,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// A current event given to the check does not encode.
    #[error("a current event does not encode: {0}")]
    Encode(#[source] CodecError),
    /// Types the enum writes today have no sample (set `ES_GOLDEN_RECORD=1`
    /// to write them from the current events given to the check).
    #[error("golden corpus {dir} has no sample of {missing:?}; run the test with {RECORD_VAR}=1 to record them, and commit them")]
    Missing {
        /// The corpus.
        dir: PathBuf,
        /// `type vN` of each missing sample.
        missing: Vec<String>,
    },
}

/// What a check of a golden corpus did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoldenReport {
    /// The samples decoded, as `(type, version)`.
    pub decoded: Vec<(String, u32)>,
    /// The samples written (with `ES_GOLDEN_RECORD` set).
    pub recorded: Vec<PathBuf>,
}

/// One event enum's golden corpus: a directory of samples.
#[derive(Clone, Debug)]
pub struct GoldenCorpus {
    dir: PathBuf,
}

impl GoldenCorpus {
    /// The corpus in `dir`.
    pub fn at(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_owned(),
        }
    }

    /// Decodes every sample through `codec`, then requires one of every
    /// type `E` declares at the version it writes, recording the missing
    /// ones from `current` (events of today's shape) when
    /// `ES_GOLDEN_RECORD` is set.
    pub fn check<E: DomainEvent>(
        &self,
        codec: &EventCodec<E>,
        current: &[E],
    ) -> Result<GoldenReport, GoldenError> {
        let record = std::env::var_os(RECORD_VAR).is_some_and(|v| !v.is_empty() && v != "0");
        self.check_recording(codec, current, record)
    }

    fn check_recording<E: DomainEvent>(
        &self,
        codec: &EventCodec<E>,
        current: &[E],
        record: bool,
    ) -> Result<GoldenReport, GoldenError> {
        let mut report = GoldenReport::default();
        for (path, event_type, version) in self.samples()? {
            let text = std::fs::read_to_string(&path).map_err(|source| GoldenError::Io {
                path: path.clone(),
                source,
            })?;
            let payload = Payload::from_json(text.trim()).map_err(|e| GoldenError::Malformed {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            codec
                .decode_parts_all(&event_type, version, &payload)
                .map_err(|source| GoldenError::Undecodable {
                    path: path.clone(),
                    source,
                })?;
            report.decoded.push((event_type, version));
        }
        let have: BTreeSet<(String, u32)> = report.decoded.iter().cloned().collect();
        let mut wanted = BTreeMap::new();
        for event in current {
            let new = codec
                .encode(event, Metadata::new())
                .map_err(GoldenError::Encode)?;
            wanted
                .entry((new.event_type.to_string(), new.schema_version))
                .or_insert(new.payload);
        }
        let mut missing = Vec::new();
        for ((event_type, version), payload) in &wanted {
            if have.contains(&(event_type.clone(), *version)) {
                continue;
            }
            if !record {
                missing.push(format!("{event_type} v{version}"));
                continue;
            }
            std::fs::create_dir_all(&self.dir).map_err(|source| GoldenError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let path = self.dir.join(file_name(event_type, *version));
            std::fs::write(&path, pretty(payload)).map_err(|source| GoldenError::Io {
                path: path.clone(),
                source,
            })?;
            report.recorded.push(path);
        }
        let sampled: BTreeSet<&str> = wanted.keys().map(|(t, _)| t.as_str()).collect();
        for name in E::EVENT_TYPES {
            if !sampled.contains(name) {
                let version = E::known_version(name).unwrap_or(1);
                if !have.contains(&((*name).to_owned(), version)) {
                    missing.push(format!("{name} v{version} (no current event given)"));
                }
            }
        }
        if missing.is_empty() {
            Ok(report)
        } else {
            Err(GoldenError::Missing {
                dir: self.dir.clone(),
                missing,
            })
        }
    }

    /// Every sample file, ordered by name: `(path, type, version)`.
    fn samples(&self) -> Result<Vec<(PathBuf, String, u32)>, GoldenError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(GoldenError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut samples = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| GoldenError::Io {
                    path: self.dir.clone(),
                    source,
                })?
                .path();
            let (event_type, version) =
                parse_name(&path).ok_or_else(|| GoldenError::Malformed {
                    path: path.clone(),
                    reason: "expected <type>.v<version>.json".into(),
                })?;
            samples.push((path, event_type, version));
        }
        samples.sort();
        Ok(samples)
    }
}

fn file_name(event_type: &str, version: u32) -> String {
    format!("{event_type}.v{version}.json")
}

fn parse_name(path: &Path) -> Option<(String, u32)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
    let (event_type, version) = name.rsplit_once(".v")?;
    Some((event_type.to_owned(), version.parse().ok()?))
}

/// The payload, pretty-printed, as a sample file holds it.
fn pretty(payload: &Payload) -> String {
    let text = payload
        .to_value()
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or_else(|| payload.as_str().to_owned());
    format!("{text}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Upcaster, Upcasters};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Light {
        Switched { on: bool },
        Dimmed { percent: u8 },
    }

    impl DomainEvent for Light {
        const EVENT_TYPES: &'static [&'static str] = &["Switched", "Dimmed"];
        fn event_type(&self) -> &'static str {
            match self {
                Self::Switched { .. } => "Switched",
                Self::Dimmed { .. } => "Dimmed",
            }
        }
        fn schema_version(&self) -> u32 {
            Self::known_version(self.event_type()).unwrap_or(1)
        }
        fn known_version(event_type: &str) -> Option<u32> {
            Some(if event_type == "Switched" { 2 } else { 1 })
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "es-golden-{name}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn current() -> [Light; 2] {
        [Light::Switched { on: true }, Light::Dimmed { percent: 40 }]
    }

    fn upcasting() -> EventCodec<Light> {
        let up = Upcasters::new()
            .with(Upcaster::new("Switched", 1, |v| {
                Ok(serde_json::json!({ "on": v["state"] == "on" }))
            }))
            .unwrap();
        EventCodec::with_upcasters(up)
    }

    #[test]
    fn recording_writes_the_missing_current_samples_once_and_then_they_pass() {
        let dir = TempDir::new("record");
        let corpus = GoldenCorpus::at(&dir.0);
        let codec = upcasting();
        let first = corpus.check_recording(&codec, &current(), true).unwrap();
        assert_eq!(first.recorded.len(), 2);
        assert!(dir.0.join("Switched.v2.json").exists());
        let second = corpus.check_recording(&codec, &current(), false).unwrap();
        assert!(second.recorded.is_empty());
        assert_eq!(
            second.decoded,
            [("Dimmed".to_owned(), 1), ("Switched".to_owned(), 2)]
        );
    }

    #[test]
    fn a_missing_sample_fails_without_recording() {
        let dir = TempDir::new("missing");
        std::fs::write(dir.0.join("Switched.v2.json"), r#"{"on":false}"#).unwrap();
        let err = GoldenCorpus::at(&dir.0)
            .check_recording(&upcasting(), &current(), false)
            .unwrap_err();
        assert!(
            matches!(err, GoldenError::Missing { ref missing, .. } if missing == &["Dimmed v1"]),
            "{err}"
        );
        // A type with no current event given is missing too.
        let err = GoldenCorpus::at(&dir.0)
            .check_recording(&upcasting(), &[Light::Switched { on: true }], false)
            .unwrap_err();
        assert!(
            matches!(err, GoldenError::Missing { ref missing, .. } if missing[0].starts_with("Dimmed v1")),
            "{err}"
        );
    }

    #[test]
    fn an_old_sample_decodes_through_the_upcasters_and_fails_without_them() {
        let dir = TempDir::new("old");
        let corpus = GoldenCorpus::at(&dir.0);
        corpus
            .check_recording(&upcasting(), &current(), true)
            .unwrap();
        std::fs::write(dir.0.join("Switched.v1.json"), r#"{"state":"on"}"#).unwrap();
        let report = corpus
            .check_recording(&upcasting(), &current(), false)
            .unwrap();
        assert!(report.decoded.contains(&("Switched".to_owned(), 1)));
        let err = corpus
            .check_recording(&EventCodec::new(), &current(), false)
            .unwrap_err();
        assert!(
            matches!(err, GoldenError::Undecodable { ref path, .. } if path.ends_with("Switched.v1.json")),
            "{err}"
        );
    }

    #[test]
    fn a_badly_named_file_is_malformed() {
        let dir = TempDir::new("named");
        std::fs::write(dir.0.join("Switched.json"), "{}").unwrap();
        let err = GoldenCorpus::at(&dir.0)
            .check_recording(&upcasting(), &current(), false)
            .unwrap_err();
        assert!(matches!(err, GoldenError::Malformed { .. }), "{err}");
    }
}
