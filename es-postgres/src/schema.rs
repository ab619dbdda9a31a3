//! Schema names and the migrations that create a schema's tables.

use sqlx::PgPool;

use crate::error::{Error, Result};

/// The longest schema name accepted (PostgreSQL allows 63 bytes; the rest is
/// kept for derived names such as notification channels).
pub const MAX_SCHEMA_LEN: usize = 40;

/// One migration: a version, a name and its SQL with `{schema}` placeholders.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "snapshots_checkpoints_inbox",
        sql: include_str!("../migrations/0002_snapshots_checkpoints_inbox.sql"),
    },
    Migration {
        version: 3,
        name: "append_group",
        sql: include_str!("../migrations/0003_append_group.sql"),
    },
    Migration {
        version: 4,
        name: "dcb_tags",
        sql: include_str!("../migrations/0004_dcb_tags.sql"),
    },
    Migration {
        version: 5,
        name: "dcb_read",
        sql: include_str!("../migrations/0005_dcb_read.sql"),
    },
];

/// Checks that `name` is a plain lower-case identifier, safe to splice into SQL.
pub(crate) fn validate_schema(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_SCHEMA_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSchemaName {
            name: name.chars().take(64).collect(),
        })
    }
}

/// The schema name quoted for SQL as an identifier: any `"` in it doubled,
/// so that no name, checked or not, can end the identifier and add SQL of
/// its own (a name [`migrate`] would reject only names a schema that does
/// not exist).
pub(crate) fn quoted(schema: &str) -> String {
    format!("\"{}\"", schema.replace('"', "\"\""))
}

/// SQL text with `{schema}` replaced by the quoted schema name.
pub(crate) fn render(sql: &str, schema: &str) -> String {
    sql.replace("{schema}", &quoted(schema))
}

/// Creates `schema` (if needed) and brings its tables to the newest version.
///
/// Idempotent, and safe when several processes run it at once: it runs in one
/// transaction under an advisory lock keyed by the schema name, and records
/// applied versions in `<schema>.es_migrations`. A failing migration rolls back
/// entirely.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<()> {
    validate_schema(schema)?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("es-postgres migrate {schema}"))
        .execute(&mut *tx)
        .await?;
    let q = quoted(schema);
    let setup = format!(
        "SET LOCAL client_min_messages = warning;
         CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.es_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());"
    );
    sqlx::Executor::execute(&mut *tx, setup.as_str()).await?;
    let current_sql = format!("SELECT max(version) FROM {q}.es_migrations");
    let current: Option<i32> = sqlx::query_scalar(&current_sql).fetch_one(&mut *tx).await?;
    let current = current.unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if current > known {
        return Err(Error::SchemaTooNew {
            schema: schema.to_owned(),
            found: current,
            known,
        });
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        let fail = |source| Error::Migration {
            schema: schema.to_owned(),
            version: migration.version,
            name: migration.name,
            source,
        };
        let sql = render(migration.sql, schema);
        sqlx::Executor::execute(&mut *tx, sql.as_str())
            .await
            .map_err(fail)?;
        let record = format!("INSERT INTO {q}.es_migrations (version, name) VALUES ($1, $2)");
        sqlx::query(&record)
            .bind(migration.version)
            .bind(migration.name)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        tracing::info!(
            schema,
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["es", "orders_1", "_x", "a".repeat(40).as_str()] {
            assert!(validate_schema(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Orders",
            "1x",
            "a-b",
            "a\"b",
            "pg_x",
            "a".repeat(41).as_str(),
        ] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            assert!(m.sql.contains("{schema}"));
        }
    }

    /// A quote in a name stays inside the identifier: unchecked names reach
    /// SQL only as one quoted identifier.
    #[test]
    fn a_quote_in_a_schema_name_cannot_end_the_identifier() {
        assert_eq!(quoted("es"), "\"es\"");
        assert_eq!(
            quoted("x\".events; DROP TABLE t; --"),
            "\"x\"\".events; DROP TABLE t; --\""
        );
        assert_eq!(
            render("SELECT 1 FROM {schema}.events", "a\"b"),
            "SELECT 1 FROM \"a\"\"b\".events"
        );
    }
}
