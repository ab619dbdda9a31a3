//! The SQLSTATE codes this crate tells apart beyond what sqlx classifies
//! (sqlx's `DatabaseError::kind()` covers the constraint violations).

/// Class 08, connection exception: every code starting with it.
pub(crate) const CONNECTION_EXCEPTION_CLASS: &str = "08";
/// `admin_shutdown`: the server is shutting down or the backend was
/// terminated.
pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
/// `crash_shutdown`: another backend crashed and the server restarts.
pub(crate) const CRASH_SHUTDOWN: &str = "57P02";
/// `cannot_connect_now`: the server is starting up or recovering.
pub(crate) const CANNOT_CONNECT_NOW: &str = "57P03";
/// `too_many_connections`.
pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";

/// `undefined_table`: a relation that does not exist.
pub(crate) const UNDEFINED_TABLE: &str = "42P01";
/// `invalid_schema_name`: a schema that does not exist.
pub(crate) const INVALID_SCHEMA_NAME: &str = "3F000";
/// `undefined_function`: a function that does not exist (the append's, in a
/// schema never migrated).
pub(crate) const UNDEFINED_FUNCTION: &str = "42883";

/// The codes a statement on a schema that was never migrated fails with.
pub(crate) const NOT_MIGRATED: &[&str] =
    &[UNDEFINED_TABLE, INVALID_SCHEMA_NAME, UNDEFINED_FUNCTION];

/// `invalid_text_representation`: a text that is not valid JSON.
pub(crate) const INVALID_TEXT_REPRESENTATION: &str = "22P02";
/// `untranslatable_character`: a `\u0000` in a JSON text.
pub(crate) const UNTRANSLATABLE_CHARACTER: &str = "22P05";
/// `invalid_escape_sequence`.
pub(crate) const INVALID_ESCAPE_SEQUENCE: &str = "22025";
/// `array_subscript_error`.
pub(crate) const ARRAY_SUBSCRIPT_ERROR: &str = "2202E";

/// The codes PostgreSQL answers a JSON text it refuses with.
pub(crate) const INVALID_JSON: &[&str] = &[
    INVALID_TEXT_REPRESENTATION,
    UNTRANSLATABLE_CHARACTER,
    INVALID_ESCAPE_SEQUENCE,
    ARRAY_SUBSCRIPT_ERROR,
];

/// Whether `error` is a database error whose SQLSTATE is one of `codes`.
pub(crate) fn is_one_of(error: &sqlx::Error, codes: &[&str]) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| codes.contains(&&*code)),
        _ => false,
    }
}

/// Whether `error` is a unique violation (SQLSTATE 23505, as sqlx
/// classifies it).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}
