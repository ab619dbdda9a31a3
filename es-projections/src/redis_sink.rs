//! A Redis sink for hot lookups: idempotent, version-guarded writes.

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// Sets a key's value and version unless the stored version is the same or
/// newer. KEYS[1] the key; ARGV: version, value, deleted (0/1), ttl in ms
/// (0: none). Returns 1 when written, 0 when the stored version won.
const PUT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then
  return 0
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', '', 'x', '1')
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'x', '0')
end
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
";

/// A stored value and the version that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The version of the write that set the value (an event's stream
    /// version, usually).
    pub version: u64,
    /// The value.
    pub value: T,
}

/// Writes read-model values to Redis so that a stale or replayed event never
/// overwrites a newer value.
///
/// Each key is a hash holding the value, its version and a deletion mark; a
/// Lua script compares versions and writes atomically on the server. Writes
/// are idempotent: writing the same version again changes nothing, so a
/// projection may write from `apply` and have a rolled-back batch replayed.
/// Deletions are version-guarded too (a tombstone keeps the version).
///
/// Versions are compared as Lua numbers: exact up to 2^53.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    prefix: String,
    ttl: Option<Duration>,
    put: Script,
}

impl fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSink")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// `text` with Redis glob characters escaped, to match it literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn redis_err(source: redis::RedisError) -> Error {
    Error::Redis { source }
}

impl RedisSink {
    /// Connects to `url` (`redis://127.0.0.1:6379`); every key gets `prefix`.
    ///
    /// # Errors
    /// [`Error::Redis`] when the URL is bad or the server cannot be reached.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let conn = client.get_connection_manager().await.map_err(redis_err)?;
        Ok(Self::new(conn, prefix))
    }

    /// A sink over an existing connection manager.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            ttl: None,
            put: Script::new(PUT),
        }
    }

    /// Expire keys `ttl` after their last write (a cache, not the source of
    /// truth: the runner can always rebuild it).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The Redis key for `key`.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn write(
        &self,
        key: &str,
        version: u64,
        value: &str,
        deleted: bool,
    ) -> Result<bool, Error> {
        let ttl = self.ttl.map_or(0, |t| t.as_millis().max(1));
        let mut conn = self.conn.clone();
        let written: i64 = self
            .put
            .key(self.redis_key(key))
            .arg(version)
            .arg(value)
            .arg(if deleted { "1" } else { "0" })
            .arg(u64::try_from(ttl).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(written == 1)
    }

    /// Sets `key` to `value` at `version`, unless the stored version is the
    /// same or newer. Returns whether it wrote.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails.
    pub async fn put(&self, key: &str, version: u64, value: &str) -> Result<bool, Error> {
        self.write(key, version, value, false).await
    }

    /// [`put`](Self::put) of a value serialized as JSON.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails; [`Error::Config`] when the value
    /// does not serialize.
    pub async fn put_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        version: u64,
        value: &T,
    ) -> Result<bool, Error> {
        let json = serde_json::to_string(value).map_err(|e| Error::Config {
            reason: format!("value for {key} does not serialize: {e}"),
        })?;
        self.put(key, version, &json).await
    }

    /// Deletes `key` as of `version` (a tombstone that older writes cannot
    /// overwrite), unless the stored version is the same or newer. Returns
    /// whether it wrote.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails.
    pub async fn delete(&self, key: &str, version: u64) -> Result<bool, Error> {
        self.write(key, version, "", true).await
    }

    /// Deletes every key under this sink's prefix, versions and tombstones
    /// included: for a cache that may have missed writes (Redis was out of
    /// reach while the read model moved on), so that readers fall back to
    /// the source of truth. Returns how many keys it deleted. Safe beside
    /// writers: a key written meanwhile is either deleted (a cache miss) or
    /// kept as written.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails (some keys may be deleted already).
    pub async fn clear(&self) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The value of `key` and its version; `None` when absent or deleted.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails.
    pub async fn get(&self, key: &str) -> Result<Option<Versioned<String>>, Error> {
        let mut conn = self.conn.clone();
        let (version, value, deleted): (Option<u64>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.redis_key(key))
                .arg("v")
                .arg("d")
                .arg("x")
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
        Ok(match (version, value, deleted.as_deref()) {
            (Some(version), Some(value), Some("0")) => Some(Versioned { version, value }),
            _ => None,
        })
    }

    /// The stored version of `key`, deleted or not.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails.
    pub async fn version(&self, key: &str) -> Result<Option<u64>, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("HGET")
            .arg(self.redis_key(key))
            .arg("v")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)
    }

    /// [`get`](Self::get) of a JSON value.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis fails; [`Error::Config`] when the stored
    /// value is not the expected JSON.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, Error> {
        let Some(stored) = self.get(key).await? else {
            return Ok(None);
        };
        let value = serde_json::from_str(&stored.value).map_err(|e| Error::Config {
            reason: format!("value of {key} is not the expected JSON: {e}"),
        })?;
        Ok(Some(Versioned {
            version: stored.version,
            value,
        }))
    }
}
