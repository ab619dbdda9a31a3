//! Parked events applied again, once the projection is fixed.

use es_core::{ProjectionError, RecordedEvent, StreamId};
use serde::Serialize;
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use super::ident;
use super::runner::{PgBackend, PgProjection, PgProjectionRunner};
use crate::Error;

/// What [`PgProjectionRunner::replay_parked`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Events applied to the read model and removed from the dead letters.
    pub applied: u64,
    /// Events the projection no longer accepts: removed from the dead letters
    /// without being applied.
    pub skipped: u64,
    /// Events the projection refused again: still parked, with the new error.
    pub still_parked: u64,
    /// Parked events the store no longer holds at their stream: still parked.
    pub missing: u64,
}

impl<P: PgProjection> PgProjectionRunner<P> {
    /// Applies the projection's parked events again, oldest first, after a
    /// fix to the projection (or to what it writes to): each one the
    /// projection now applies leaves the dead letters in the same
    /// transaction, so a parked event is applied at most once, however many
    /// replays run. One the projection refuses again stays parked with the
    /// new error; the others are applied all the same.
    ///
    /// The replay takes the lock every batch of the projection takes, so it
    /// runs between two of the running runner's batches, never beside one.
    /// An event is applied where the model is now, after the events that
    /// followed it in the log: the projection must make sense of it there.
    ///
    /// # Errors
    /// The read model's storage failing ([`ProjectionError::Storage`], as
    /// [`Error::ReadModel`]), the database or the store failing: nothing is
    /// applied and every event stays parked.
    pub async fn replay_parked(&self) -> Result<ReplayReport, Error> {
        let name = self.projection.name().to_owned();
        let span = tracing::info_span!("es.projection.replay_parked", projection = %name);
        async {
            let backend = PgBackend::new(self, &self.model_schema, &name, &name)?;
            let schema = ident(&self.schema)?;
            let mut tx = backend.open().await?;
            backend.locked_checkpoint(&mut tx).await?;
            let rows: Vec<(Uuid, String)> = sqlx::query_as(&format!(
                "SELECT event_id, stream_id FROM {schema}.projection_dead_letters \
                 WHERE projection = $1 ORDER BY major, minor FOR UPDATE"
            ))
            .bind(&name)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| Error::db(&name, e))?;
            let mut report = ReplayReport::default();
            for (event_id, stream_id) in rows {
                let Some(event) = self.find(event_id, &stream_id).await? else {
                    tracing::warn!(%event_id, stream = %stream_id, "a parked event is not in its stream");
                    report.missing += 1;
                    continue;
                };
                if !self.projection.accepts(&event.event_type) {
                    self.forget(&mut tx, &schema, event_id).await?;
                    report.skipped += 1;
                    continue;
                }
                self.savepoint(&mut tx, "SAVEPOINT es_replay").await?;
                match self.projection.apply(&mut tx, &event).await {
                    Ok(()) => {
                        self.savepoint(&mut tx, "RELEASE SAVEPOINT es_replay")
                            .await?;
                        self.forget(&mut tx, &schema, event_id).await?;
                        report.applied += 1;
                    }
                    Err(error @ ProjectionError::Storage { .. }) => {
                        return Err(Error::ReadModel {
                            projection: name.clone(),
                            position: event.position,
                            source: Box::new(error),
                        });
                    }
                    Err(error) => {
                        self.savepoint(&mut tx, "ROLLBACK TO SAVEPOINT es_replay")
                            .await?;
                        tracing::warn!(event_id = %event.event_id, %error, "a parked event is refused again");
                        sqlx::query(&format!(
                            "UPDATE {schema}.projection_dead_letters SET error = $3, failed_at = now() \
                             WHERE projection = $1 AND event_id = $2"
                        ))
                        .bind(&name)
                        .bind(event_id)
                        .bind(error.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| Error::db(&name, e))?;
                        report.still_parked += 1;
                    }
                }
            }
            tx.commit().await.map_err(|e| Error::db(&name, e))?;
            tracing::info!(
                applied = report.applied,
                skipped = report.skipped,
                still_parked = report.still_parked,
                missing = report.missing,
                "parked events replayed"
            );
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// The parked event, read from its stream.
    async fn find(&self, event_id: Uuid, stream_id: &str) -> Result<Option<RecordedEvent>, Error> {
        let name = self.projection.name();
        let Ok(stream) = StreamId::new(stream_id) else {
            return Ok(None);
        };
        let mut from = 1;
        loop {
            let page = self
                .store
                .read_stream(&stream, from, 1_000)
                .await
                .map_err(|e| Error::store(name, e))?;
            if let Some(event) = page.iter().find(|e| e.event_id == event_id) {
                return Ok(Some(event.clone()));
            }
            match page.last() {
                Some(last) if page.len() == 1_000 => from = last.stream_version + 1,
                _ => return Ok(None),
            }
        }
    }

    async fn forget(
        &self,
        tx: &mut PgConnection,
        schema: &str,
        event_id: Uuid,
    ) -> Result<(), Error> {
        let name = self.projection.name();
        sqlx::query(&format!(
            "DELETE FROM {schema}.projection_dead_letters WHERE projection = $1 AND event_id = $2"
        ))
        .bind(name)
        .bind(event_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::db(name, e))?;
        Ok(())
    }

    async fn savepoint(&self, tx: &mut PgConnection, sql: &str) -> Result<(), Error> {
        sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::db(self.projection.name(), e))?;
        Ok(())
    }
}
