//! The SQL text of the event store, rendered once per schema.

use super::rows::{REPLAY_COLUMNS, STREAM_COLUMNS};
use crate::schema::quoted;

/// The statements of one store, with its schema spliced in (quoted).
#[derive(Debug)]
pub(super) struct Sql {
    pub(super) append_fast: String,
    pub(super) append_one: String,
    pub(super) append: String,
    pub(super) append_group: String,
    pub(super) append_group_fast: String,
    pub(super) append_group_one: String,
    pub(super) read_stream: String,
    pub(super) read_stream_replay: String,
    pub(super) read_all: String,
    pub(super) read_all_held: String,
    pub(super) last_pending: String,
    pub(super) xmin: String,
    pub(super) head: String,
    pub(super) version: String,
    pub(super) holdback: String,
    pub(super) append_tagged: String,
    pub(super) lock_tags: String,
    pub(super) read_query: String,
    pub(super) read_by_query: String,
}

const COLUMNS: &str = "global_position, transaction_id, stream_id, stream_version, event_id, \
                       event_type, schema_version, payload::text, metadata::text, recorded_at, tags";

/// The `NOTIFY` an append statement carries: `pg_notify` on the channel `$9`
/// with the store instance's payload `$10` when the channel is not NULL,
/// evaluated once (a CTE with a volatile function is materialized, and so
/// run once). Queued in the statement's transaction, it is delivered when
/// that commits.
const NOTE: &str =
    "note AS MATERIALIZED (SELECT pg_notify($9, $10::text) WHERE $9::text IS NOT NULL)";

/// The one row that makes a statement run [`NOTE`].
const NOTED: &str = "(SELECT count(*) FROM note) AS noted";

/// The log's readable horizon: rows of transactions below it are final.
const XMIN: &str = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

impl Sql {
    pub(super) fn new(schema: &str) -> Self {
        let s = quoted(schema);
        // A page of one stream's events (`$1` the stream, `$2` the first
        // version, `$3` the most rows), as `columns`.
        let stream_read = |columns: &str| {
            format!(
                "SELECT {columns} FROM {s}.events WHERE tenant = '' AND stream_id = $1 \
                 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
            )
        };
        Self {
            // One append in one plain statement; `$9`: the channel of the
            // NOTIFY it carries, or NULL.
            append_fast: format!(
                "WITH {NOTE}, \
                 cur AS (SELECT coalesce((SELECT stream_version FROM {s}.events \
                                WHERE tenant = $1 AND stream_id = $2 \
                                ORDER BY stream_version DESC LIMIT 1), 0) AS v), \
                 ok AS (SELECT v FROM cur WHERE $3 = -1 OR ($3 = -2 AND v = 0) OR ($3 = -3 AND v > 0) OR $3 = v), \
                 ins AS (INSERT INTO {s}.events (transaction_id, tenant, stream_id, stream_version, \
                                event_id, event_type, schema_version, payload, metadata) \
                         SELECT pg_current_xact_id()::text::bigint, $1, $2, ok.v + u.i, u.id, u.ty, u.sv, \
                                u.pl::json, u.md::json \
                           FROM ok, unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                                WITH ORDINALITY AS u(id, ty, sv, pl, md, i) \
                          ORDER BY u.i \
                         RETURNING transaction_id, global_position, stream_version) \
                 SELECT (SELECT max(stream_version) FROM ins), (SELECT max(transaction_id) FROM ins), \
                        (SELECT max(global_position) FROM ins), (SELECT v FROM cur), \
                        CASE WHEN NOT EXISTS (SELECT 1 FROM ok) \
                             THEN EXISTS (SELECT 1 FROM {s}.events WHERE event_id = ANY ($4::uuid[])) END \
                   FROM {NOTED}"
            ),
            // One event appended expecting version `$3` (0: no stream) in
            // a bare INSERT: the row goes in at version `$3 + 1` when
            // version `$3` exists (or `$3` is 0). Versions are gap-free, so
            // that and the primary key together check the expectation: no
            // row means version `$3` does not exist, a unique violation that
            // version `$3 + 1` (or the event id) does; the caller then
            // decides with the full statement. `$9`: the channel of the
            // NOTIFY it carries, or NULL.
            append_one: format!(
                "WITH {NOTE} \
                 INSERT INTO {s}.events (transaction_id, tenant, stream_id, stream_version, \
                        event_id, event_type, schema_version, payload, metadata) \
                 SELECT pg_current_xact_id()::text::bigint, $1, $2, $3 + 1, $4, $5, $6, $7::json, $8::json \
                   FROM {NOTED} \
                  WHERE $3 = 0 OR EXISTS (SELECT 1 FROM {s}.events \
                                           WHERE tenant = $1 AND stream_id = $2 AND stream_version = $3) \
                 RETURNING transaction_id, global_position"
            ),
            append: format!("SELECT outcome, out_version, out_tx, out_position, out_event FROM {s}.append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
            append_group: format!("SELECT item, outcome, out_version, out_tx, out_position, out_event FROM {s}.append_group($1, $2, $3, $4, $5, $6, $7, $8)"),
            // A group of appends to distinct streams in one plain statement:
            // every expected version checked, then every event inserted; if
            // any expectation fails nothing is inserted (the rows say which)
            // and the append_group function decides the appends one by one.
            // Each row also gives the stream's version before the statement
            // and whether every expectation held (an append of no events,
            // which only checks a version, inserts nothing either way).
            // `$9`: the channel of the NOTIFY it carries, or NULL.
            append_group_fast: format!(
                "WITH {NOTE}, \
                 req AS (SELECT r.stream, r.expected, r.cnt, r.k, \
                                     (sum(r.cnt) OVER (ORDER BY r.k) - r.cnt)::int8 AS off \
                                FROM unnest($1::text[], $2::int8[], $3::int4[]) WITH ORDINALITY AS r(stream, expected, cnt, k)), \
                 cur AS (SELECT req.*, coalesce((SELECT e.stream_version FROM {s}.events e \
                                 WHERE e.tenant = '' AND e.stream_id = req.stream \
                                 ORDER BY e.stream_version DESC LIMIT 1), 0) AS v FROM req), \
                 bad AS (SELECT k FROM cur WHERE NOT (expected = -1 OR (expected = -2 AND v = 0) \
                                 OR (expected = -3 AND v > 0) OR expected = v)), \
                 ins AS (INSERT INTO {s}.events (transaction_id, tenant, stream_id, stream_version, \
                                event_id, event_type, schema_version, payload, metadata) \
                         SELECT pg_current_xact_id()::text::bigint, '', cur.stream, cur.v + (u.i - cur.off), \
                                u.id, u.ty, u.sv, u.pl::json, u.md::json \
                           FROM unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                                WITH ORDINALITY AS u(id, ty, sv, pl, md, i) \
                           JOIN cur ON u.i > cur.off AND u.i <= cur.off + cur.cnt \
                          WHERE NOT EXISTS (SELECT 1 FROM bad) \
                          ORDER BY u.i \
                         RETURNING stream_id, transaction_id, global_position, stream_version) \
                 SELECT cur.k::int4, max(ins.stream_version), max(ins.transaction_id), max(ins.global_position), \
                        cur.v, NOT EXISTS (SELECT 1 FROM bad) \
                   FROM {NOTED} CROSS JOIN cur LEFT JOIN ins ON ins.stream_id = cur.stream \
                  GROUP BY cur.k, cur.v ORDER BY cur.k"
            ),
            // A group of single events to distinct streams, each expecting
            // version `$2[k]` (0: no stream), in one bare INSERT, checked as
            // `append_one` checks one: the events whose expected version
            // exists (or is 0) go in, in the order given (the lock order);
            // each row names the stream it wrote. `$8`: the
            // tenant; `$9`: the channel of the NOTIFY it carries, or NULL.
            append_group_one: format!(
                "WITH {NOTE} \
                 INSERT INTO {s}.events (transaction_id, tenant, stream_id, stream_version, \
                        event_id, event_type, schema_version, payload, metadata) \
                 SELECT pg_current_xact_id()::text::bigint, $8, u.stream, u.v + 1, u.id, u.ty, u.sv, \
                        u.pl::json, u.md::json \
                   FROM {NOTED}, unnest($1::text[], $2::int8[], $3::uuid[], $4::text[], $5::int4[], \
                                        $6::text[], $7::text[]) WITH ORDINALITY AS u(stream, v, id, ty, sv, pl, md, i) \
                  WHERE u.v = 0 OR EXISTS (SELECT 1 FROM {s}.events e WHERE e.tenant = $8 \
                                             AND e.stream_id = u.stream AND e.stream_version = u.v) \
                  ORDER BY u.i \
                 RETURNING stream_id, transaction_id, global_position"
            ),
            read_stream: stream_read(STREAM_COLUMNS),
            read_stream_replay: stream_read(REPLAY_COLUMNS),
            read_all: format!(
                "SELECT {COLUMNS} FROM {s}.events WHERE (transaction_id, global_position) > ($1, $2) \
                 AND transaction_id < {XMIN} ORDER BY transaction_id, global_position LIMIT $3"
            ),
            // The page, and in the same snapshot the oldest transaction with
            // committed rows not readable yet (at or above the horizon): one
            // index seek, whatever those transactions hold. Always one row
            // at least: an empty page is one row of NULL event columns.
            read_all_held: format!(
                "WITH h AS (SELECT min(transaction_id) AS held FROM {s}.events \
                            WHERE transaction_id >= {XMIN}) \
                 SELECT h.held, e.* FROM h LEFT JOIN LATERAL \
                   (SELECT {COLUMNS} FROM {s}.events WHERE (transaction_id, global_position) > ($1, $2) \
                     AND transaction_id < {XMIN} ORDER BY transaction_id, global_position LIMIT $3) e ON true"
            ),
            last_pending: format!("SELECT max(transaction_id) FROM {s}.events WHERE transaction_id >= {XMIN}"),
            xmin: format!("SELECT {XMIN}"),
            head: format!(
                "SELECT transaction_id, global_position FROM {s}.events WHERE transaction_id < {XMIN} \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
            ),
            version: format!(
                "SELECT coalesce(max(stream_version), 0) FROM {s}.events WHERE tenant = '' AND stream_id = $1"
            ),
            holdback: format!(
                "WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, \
                                      pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax), \
                      oldest AS (SELECT pid, datname, extract(epoch FROM now() - xact_start)::float8 AS age \
                                   FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
                                  ORDER BY age(backend_xid) DESC LIMIT 1) \
                 SELECT snap.xmin, snap.xmax, \
                        (SELECT count(*) FROM {s}.events WHERE transaction_id >= snap.xmin), \
                        oldest.pid, oldest.datname::text, oldest.age \
                   FROM snap LEFT JOIN oldest ON true"
            ),
            append_tagged: format!(
                "SELECT outcome, out_version, out_tx, out_position, out_event FROM {s}.append_tagged(\
                 $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
            ),
            lock_tags: format!("SELECT {s}.lock_tags($1, $2)"),
            // A read by query that holds its query's keys (`$1`) while it
            // reads: no row when another transaction holds one of them.
            read_by_query: format!("SELECT * FROM {s}.read_by_query($1, $2, $3, $4, $5)"),
            // A page of the events matching the query `$3` (items as
            // [{"types": [...], "tags": [...]}]) after ($1, $2), below the
            // horizon as read_all reads; in the same snapshot the horizon
            // itself (the marker of a short page) and the oldest
            // transaction with committed rows not readable yet. Each item
            // is looked up by its first tag in event_tags and checked
            // against all of its tags, in a LATERAL with a LIMIT, so that
            // every lookup is an index scan whatever the planner guesses
            // of the items' number. Always one row at least: an empty page
            // is one row of NULL event columns.
            // The held-back check looks at the query's own rows only: a
            // read waits for the transactions that hold back what it
            // selects, not for every write in the log. An item of one tag
            // is matched by the tag index alone; one of several also reads
            // each candidate's tags.
            read_query: format!(
                "WITH h AS (SELECT {XMIN} AS x, \
                                   pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xm, \
                                   (SELECT min(w.transaction_id) \
                                      FROM jsonb_array_elements($3::jsonb) AS q(item) \
                                      CROSS JOIN LATERAL \
                                        (SELECT t.transaction_id FROM {s}.event_tags t \
                                          WHERE t.tag = q.item->'tags'->>0 \
                                            AND (jsonb_array_length(q.item->'types') = 0 OR q.item->'types' ? t.event_type) \
                                            AND t.transaction_id >= {XMIN} \
                                          ORDER BY t.transaction_id LIMIT 1) w) AS held) \
                 SELECT h.x, h.held, h.xm, e.* FROM h LEFT JOIN LATERAL \
                   (SELECT ev.* FROM \
                      (SELECT DISTINCT m.transaction_id, m.global_position \
                         FROM jsonb_array_elements($3::jsonb) AS q(item) \
                         CROSS JOIN LATERAL \
                           (SELECT t.transaction_id, t.global_position FROM {s}.event_tags t \
                             WHERE t.tag = q.item->'tags'->>0 \
                               AND (jsonb_array_length(q.item->'types') = 0 OR q.item->'types' ? t.event_type) \
                               AND (t.transaction_id, t.global_position) > ($1, $2) AND t.transaction_id < h.x \
                               AND (jsonb_array_length(q.item->'tags') = 1 \
                                    OR (SELECT x.tags FROM {s}.events x WHERE x.transaction_id = t.transaction_id \
                                          AND x.global_position = t.global_position) \
                                       @> ARRAY(SELECT jsonb_array_elements_text(q.item->'tags'))) \
                             ORDER BY t.transaction_id, t.global_position LIMIT $4) m \
                        ORDER BY 1, 2 LIMIT $4) k \
                    CROSS JOIN LATERAL \
                      (SELECT {COLUMNS} FROM {s}.events WHERE transaction_id = k.transaction_id \
                          AND global_position = k.global_position LIMIT 1) ev \
                    ORDER BY ev.transaction_id, ev.global_position) e ON true"
            ),
        }
    }
}
