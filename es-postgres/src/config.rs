//! Connection settings: a URL or the usual `PG*` environment variables, pool
//! size and timeouts.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::schema::validate_schema;
use crate::PgEventStore;

/// How to reach PostgreSQL and which schema to use.
///
/// ```no_run
/// # async fn demo() -> Result<(), es_postgres::Error> {
/// use std::time::Duration;
/// let store = es_postgres::PgConfig::from_url("postgres://postgres@127.0.0.1:5432/postgres")?
///     .schema("orders")
///     .max_connections(16)
///     .acquire_timeout(Duration::from_secs(5))
///     .event_store()
///     .await?;
/// # drop(store); Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgConfig {
    options: PgConnectOptions,
    schema: String,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    idle_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
    migrate: bool,
}

impl PgConfig {
    /// Settings from the environment: `DATABASE_URL` when it is set, otherwise
    /// the libpq variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
    /// `PGDATABASE`, `PGSSLMODE`, ...) with their defaults.
    pub fn from_env() -> Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Self::from_url(&url),
            _ => Ok(Self::with_options(PgConnectOptions::new())),
        }
    }

    /// Settings from a `postgres://` URL; what the URL leaves out comes from
    /// the `PG*` variables.
    pub fn from_url(url: &str) -> Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::InvalidConfig {
                reason: "the URL must start with postgres:// or postgresql://".to_owned(),
            });
        }
        let options = PgConnectOptions::from_str(url).map_err(|e| Error::InvalidConfig {
            reason: e.to_string(),
        })?;
        Ok(Self::with_options(options))
    }

    /// Settings from ready-made connect options.
    pub fn with_options(options: PgConnectOptions) -> Self {
        Self {
            options,
            schema: "es".to_owned(),
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
            statement_timeout: None,
            migrate: true,
        }
    }

    /// The schema the store's tables live in (default `es`).
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The pool's maximum number of connections (default 10).
    #[must_use]
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Connections the pool keeps open when idle (default 0).
    #[must_use]
    pub fn min_connections(mut self, n: u32) -> Self {
        self.min_connections = n;
        self
    }

    /// How long an operation waits for a connection, including connecting,
    /// before failing as unavailable (default 10 s).
    #[must_use]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long an idle connection stays open (default 5 min; `None`: forever).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// A server-side `statement_timeout` for every connection (default none).
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether [`PgConfig::event_store`] runs the migrations (default true).
    #[must_use]
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// The connect options the pool uses.
    pub fn connect_options(&self) -> PgConnectOptions {
        let mut options = self.options.clone();
        if let Some(timeout) = self.statement_timeout {
            options = options.options([("statement_timeout", format!("{}", timeout.as_millis()))]);
        }
        options
    }

    /// A pool that connects lazily: building it never fails on an absent
    /// server; the first operation does, as unavailable.
    pub fn pool_lazy(&self) -> PgPool {
        self.pool_options()
            .connect_lazy_with(self.connect_options())
    }

    /// A pool with one connection opened to check the server answers.
    pub async fn pool(&self) -> Result<PgPool> {
        Ok(self
            .pool_options()
            .connect_with(self.connect_options())
            .await?)
    }

    /// Connects, migrates the schema (unless turned off) and returns the store.
    pub async fn event_store(&self) -> Result<PgEventStore> {
        validate_schema(&self.schema)?;
        let pool = self.pool().await?;
        if self.migrate {
            crate::migrate(&pool, &self.schema).await?;
        }
        PgEventStore::try_new(pool, self.schema.clone())
    }

    fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.min_connections)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(self.idle_timeout)
    }
}

/// Shows where it connects, never the password.
impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("database", &self.options.get_database())
            .field("username", &self.options.get_username())
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("migrate", &self.migrate)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_shows_no_password() {
        let config = super::PgConfig::from_url("postgres://app:s3cr3t@db:5432/orders").unwrap();
        let shown = format!("{config:?}");
        assert!(
            shown.contains("\"db\"") && shown.contains("\"app\""),
            "{shown}"
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
