//! Helpers for read-model tables written inside the runner's transaction.

use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::ident;
use crate::Error;

/// A value for an [`Upsert`] column.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// `text`.
    Text(String),
    /// `bigint`.
    I64(i64),
    /// `boolean`.
    Bool(bool),
    /// `uuid`.
    Uuid(uuid::Uuid),
    /// `jsonb`.
    Json(serde_json::Value),
    /// `timestamptz`.
    Timestamp(chrono::DateTime<chrono::Utc>),
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(value: $t) -> Self {
                Self::$v(value.into())
            }
        }
    )*};
}
value_from!(String => Text, &str => Text, i64 => I64, i32 => I64, bool => Bool,
    uuid::Uuid => Uuid, serde_json::Value => Json, chrono::DateTime<chrono::Utc> => Timestamp);

/// An `INSERT ... ON CONFLICT (key) DO UPDATE` on one row, optionally guarded
/// by a version column so that a replayed or stale event never overwrites a
/// newer row.
///
/// ```no_run
/// # async fn f(tx: &mut sqlx::PgConnection) -> Result<(), es_projections::Error> {
/// use es_projections::postgres::sink::Upsert;
/// Upsert::into("orders")
///     .key("order_id", "o-1")
///     .set("status", "paid")
///     .set("total_cents", 1250_i64)
///     .version("version", 3)
///     .execute(tx)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Upsert {
    table: String,
    keys: Vec<(String, Value)>,
    columns: Vec<(String, Value)>,
    version: Option<(String, i64)>,
}

impl Upsert {
    /// An upsert into `table` (unqualified: resolved through the runner's
    /// `search_path`).
    pub fn into(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            keys: Vec::new(),
            columns: Vec::new(),
            version: None,
        }
    }

    /// A key column (part of the table's primary key or a unique index).
    #[must_use]
    pub fn key(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.keys.push((column.to_owned(), value.into()));
        self
    }

    /// A column set on insert and on update.
    #[must_use]
    pub fn set(mut self, column: &str, value: impl Into<Value>) -> Self {
        self.columns.push((column.to_owned(), value.into()));
        self
    }

    /// A version column: the row is updated only when `version` is greater
    /// than the stored one (use the event's stream version).
    #[must_use]
    pub fn version(mut self, column: &str, version: u64) -> Self {
        self.version = Some((
            column.to_owned(),
            i64::try_from(version).unwrap_or(i64::MAX),
        ));
        self
    }

    /// Runs the upsert in `conn` (the runner's transaction). Returns whether
    /// a row was inserted or updated (false when the version guard kept a
    /// newer row).
    ///
    /// # Errors
    /// [`Error::Config`] for a bad identifier or no key; [`Error::Database`]
    /// when PostgreSQL fails.
    pub async fn execute(&self, conn: &mut PgConnection) -> Result<bool, Error> {
        if self.keys.is_empty() {
            return Err(Error::Config {
                reason: format!("upsert into {} has no key column", self.table),
            });
        }
        let table = ident(&self.table)?;
        let mut names = Vec::new();
        for (column, _) in self.keys.iter().chain(&self.columns) {
            names.push(ident(column)?);
        }
        let version = match &self.version {
            Some((column, v)) => Some((ident(column)?, *v)),
            None => None,
        };
        let mut q: QueryBuilder<'_, Postgres> = QueryBuilder::new(format!("INSERT INTO {table} ("));
        let mut all: Vec<String> = names.clone();
        if let Some((column, _)) = &version {
            all.push(column.clone());
        }
        q.push(all.join(", ")).push(") VALUES (");
        let mut sep = q.separated(", ");
        for (_, value) in self.keys.iter().chain(&self.columns) {
            push_value(&mut sep, value);
        }
        if let Some((_, v)) = &version {
            sep.push_bind(*v);
        }
        q.push(") ON CONFLICT (");
        q.push(names[..self.keys.len()].join(", "));
        let updates: Vec<String> = all[self.keys.len()..]
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        if updates.is_empty() {
            q.push(") DO NOTHING");
        } else {
            q.push(") DO UPDATE SET ").push(updates.join(", "));
            if let Some((column, _)) = &version {
                q.push(format!(" WHERE {table}.{column} < EXCLUDED.{column}"));
            }
        }
        let done = q
            .build()
            .execute(conn)
            .await
            .map_err(|e| Error::db(&self.table, e))?;
        Ok(done.rows_affected() > 0)
    }
}

fn push_value(sep: &mut sqlx::query_builder::Separated<'_, '_, Postgres, &str>, value: &Value) {
    match value.clone() {
        Value::Null => {
            sep.push("NULL");
        }
        Value::Text(v) => {
            sep.push_bind(v);
        }
        Value::I64(v) => {
            sep.push_bind(v);
        }
        Value::Bool(v) => {
            sep.push_bind(v);
        }
        Value::Uuid(v) => {
            sep.push_bind(v);
        }
        Value::Json(v) => {
            sep.push_bind(sqlx::types::Json(v));
        }
        Value::Timestamp(v) => {
            sep.push_bind(v);
        }
    }
}

/// Deletes the rows of `table` (unqualified) whose `key` column equals
/// `value`, inside the runner's transaction. Returns how many rows went.
///
/// # Errors
/// [`Error::Config`] for a bad identifier; [`Error::Database`] when
/// PostgreSQL fails.
pub async fn delete(
    conn: &mut PgConnection,
    table: &str,
    key: &str,
    value: impl Into<Value>,
) -> Result<u64, Error> {
    let mut q: QueryBuilder<'_, Postgres> = QueryBuilder::new(format!(
        "DELETE FROM {} WHERE {} = ",
        ident(table)?,
        ident(key)?
    ));
    let value = value.into();
    {
        let mut sep = q.separated("");
        push_value(&mut sep, &value);
    }
    let done = q
        .build()
        .execute(conn)
        .await
        .map_err(|e| Error::db(table, e))?;
    Ok(done.rows_affected())
}
