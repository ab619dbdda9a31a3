-- The event log. One row per event; the stream key includes the tenant so a
-- later multi-tenant API needs no offline migration.
--
-- transaction_id is the writing transaction's pg_current_xact_id(); the log
-- order is (transaction_id, global_position), and readers only read rows whose
-- transaction is older than pg_snapshot_xmin(pg_current_snapshot()): every such
-- transaction has finished, so nothing can still commit below what they read.
--
-- payload and metadata are `json`, not `jsonb`: the store only checks they are
-- JSON and gives back the exact text it was given (cheaper to write and to
-- read back; cast to jsonb to query inside them).
CREATE TABLE IF NOT EXISTS {schema}.events (
    global_position bigserial NOT NULL,
    transaction_id bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    tenant text NOT NULL DEFAULT '',
    stream_id text NOT NULL CHECK (octet_length(stream_id) BETWEEN 1 AND 200),
    stream_version bigint NOT NULL CHECK (stream_version > 0),
    event_id uuid NOT NULL,
    event_type text NOT NULL CHECK (event_type <> ''),
    schema_version integer NOT NULL,
    payload json NOT NULL,
    metadata json NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_key PRIMARY KEY (tenant, stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

CREATE INDEX IF NOT EXISTS events_log_order ON {schema}.events (transaction_id, global_position);

-- Decides an append whose events (some or all) are already stored, with the
-- rules of es-core's in-memory store:
--   10 only part of the batch is stored, 11 stored in another stream,
--   2  the expected version does not fit the stored positions,
--   12 stored at other positions, 13 stored with another type or payload,
--   1  the same batch at the same positions: an idempotent success.
CREATE OR REPLACE FUNCTION {schema}.replayed(
    p_tenant text, p_stream text, p_expected bigint,
    p_ids uuid[], p_types text[], p_versions integer[], p_payloads text[])
RETURNS TABLE (outcome integer, out_version bigint, out_tx bigint, out_position bigint, out_event uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_n integer := cardinality(p_ids);
    v_found integer;
    v_first record;
    v_row record;
    v_start bigint;
    v_actual bigint;
    v_missing uuid;
    v_last_version bigint;
    v_last_tx bigint;
    v_last_position bigint;
BEGIN
    SELECT count(*) INTO v_found FROM {schema}.events e WHERE e.event_id = ANY (p_ids);
    IF v_found <> v_n THEN
        SELECT u.id INTO v_missing
          FROM unnest(p_ids) WITH ORDINALITY AS u(id, i)
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.events e WHERE e.event_id = u.id)
         ORDER BY u.i LIMIT 1;
        RETURN QUERY SELECT 10, NULL::bigint, NULL::bigint, NULL::bigint, coalesce(v_missing, p_ids[1]);
        RETURN;
    END IF;
    SELECT e.tenant, e.stream_id, e.stream_version INTO v_first
      FROM {schema}.events e WHERE e.event_id = p_ids[1];
    IF v_first.tenant <> p_tenant OR v_first.stream_id <> p_stream THEN
        RETURN QUERY SELECT 11, NULL::bigint, NULL::bigint, NULL::bigint, p_ids[1];
        RETURN;
    END IF;
    v_start := v_first.stream_version;
    IF NOT (p_expected IN (-1, -3)
            OR (p_expected = -2 AND v_start = 1)
            OR (p_expected >= 0 AND v_start = p_expected + 1)) THEN
        SELECT e.stream_version INTO v_actual FROM {schema}.events e
         WHERE e.tenant = p_tenant AND e.stream_id = p_stream
         ORDER BY e.stream_version DESC LIMIT 1;
        RETURN QUERY SELECT 2, coalesce(v_actual, 0), NULL::bigint, NULL::bigint, NULL::uuid;
        RETURN;
    END IF;
    FOR v_row IN
        SELECT u.i, u.id, u.ty, u.sv, u.pl, e.tenant, e.stream_id, e.stream_version,
               e.event_type, e.schema_version, e.payload, e.transaction_id, e.global_position
          FROM unnest(p_ids, p_types, p_versions, p_payloads) WITH ORDINALITY AS u(id, ty, sv, pl, i)
          JOIN {schema}.events e ON e.event_id = u.id
         ORDER BY u.i
    LOOP
        IF v_row.tenant <> p_tenant OR v_row.stream_id <> p_stream
           OR v_row.stream_version <> v_start + v_row.i - 1 THEN
            RETURN QUERY SELECT 12, NULL::bigint, NULL::bigint, NULL::bigint, v_row.id;
            RETURN;
        END IF;
        IF v_row.event_type <> v_row.ty OR v_row.schema_version <> v_row.sv
           OR v_row.payload::jsonb <> v_row.pl::jsonb THEN
            RETURN QUERY SELECT 13, NULL::bigint, NULL::bigint, NULL::bigint, v_row.id;
            RETURN;
        END IF;
        v_last_version := v_row.stream_version;
        v_last_tx := v_row.transaction_id;
        v_last_position := v_row.global_position;
    END LOOP;
    RETURN QUERY SELECT 1, v_last_version, v_last_tx, v_last_position, NULL::uuid;
END
$fn$;

-- Appends a batch to one stream in one call. p_expected: -1 any, -2 no
-- stream, -3 stream exists, n >= 0 exactly version n. Outcomes: 0 written
-- (out_version, out_tx, out_position of the last event), 1 nothing written
-- (an idempotent replay, or an empty batch), 2 wrong expected version
-- (out_version is the actual version), 10..13 idempotency conflicts (see
-- replayed). A payload that is not JSON raises invalid_text_representation.
-- p_guarded: handle a race with a concurrent append inside (a subtransaction,
-- for callers inside their own transaction); otherwise the race raises
-- unique_violation and the caller calls again.
CREATE OR REPLACE FUNCTION {schema}.append_events(
    p_tenant text, p_stream text, p_expected bigint,
    p_ids uuid[], p_types text[], p_versions integer[], p_payloads text[], p_metadata text[],
    p_guarded boolean)
RETURNS TABLE (outcome integer, out_version bigint, out_tx bigint, out_position bigint, out_event uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_n integer := coalesce(cardinality(p_ids), 0);
    v_actual bigint;
    v_tx bigint;
    v_last bigint;
BEGIN
    LOOP
        v_actual := NULL;
        SELECT e.stream_version INTO v_actual FROM {schema}.events e
         WHERE e.tenant = p_tenant AND e.stream_id = p_stream
         ORDER BY e.stream_version DESC LIMIT 1;
        v_actual := coalesce(v_actual, 0);
        IF NOT (p_expected = -1
                OR (p_expected = -2 AND v_actual = 0)
                OR (p_expected = -3 AND v_actual > 0)
                OR p_expected = v_actual) THEN
            IF v_n > 0 AND EXISTS (SELECT 1 FROM {schema}.events e WHERE e.event_id = ANY (p_ids)) THEN
                RETURN QUERY SELECT * FROM {schema}.replayed(
                    p_tenant, p_stream, p_expected, p_ids, p_types, p_versions, p_payloads);
                RETURN;
            END IF;
            RETURN QUERY SELECT 2, v_actual, NULL::bigint, NULL::bigint, NULL::uuid;
            RETURN;
        END IF;
        IF v_n = 0 THEN
            RETURN QUERY SELECT 1, v_actual, NULL::bigint, NULL::bigint, NULL::uuid;
            RETURN;
        END IF;
        v_tx := pg_current_xact_id()::text::bigint;
        IF NOT p_guarded THEN
            -- The fast path, without a subtransaction: a race with a
            -- concurrent append raises unique_violation and the caller (not in
            -- a transaction of its own) calls again.
            WITH inserted AS (
                INSERT INTO {schema}.events (transaction_id, tenant, stream_id, stream_version,
                                            event_id, event_type, schema_version, payload, metadata)
                SELECT v_tx, p_tenant, p_stream, v_actual + u.i, u.id, u.ty, u.sv, u.pl::json, u.md::json
                  FROM unnest(p_ids, p_types, p_versions, p_payloads, p_metadata)
                       WITH ORDINALITY AS u(id, ty, sv, pl, md, i)
                 ORDER BY u.i
                RETURNING global_position
            )
            SELECT max(global_position) INTO v_last FROM inserted;
            RETURN QUERY SELECT 0, v_actual + v_n, v_tx, v_last, NULL::uuid;
            RETURN;
        END IF;
        BEGIN
            WITH inserted AS (
                INSERT INTO {schema}.events (transaction_id, tenant, stream_id, stream_version,
                                            event_id, event_type, schema_version, payload, metadata)
                SELECT v_tx, p_tenant, p_stream, v_actual + u.i, u.id, u.ty, u.sv, u.pl::json, u.md::json
                  FROM unnest(p_ids, p_types, p_versions, p_payloads, p_metadata)
                       WITH ORDINALITY AS u(id, ty, sv, pl, md, i)
                 ORDER BY u.i
                RETURNING global_position
            )
            SELECT max(global_position) INTO v_last FROM inserted;
            RETURN QUERY SELECT 0, v_actual + v_n, v_tx, v_last, NULL::uuid;
            RETURN;
        EXCEPTION WHEN unique_violation THEN
            -- Either some ids are stored (a replay, possibly committed by a
            -- concurrent twin just now), or a concurrent append took these
            -- versions: re-read the version and decide again.
            IF EXISTS (SELECT 1 FROM {schema}.events e WHERE e.event_id = ANY (p_ids)) THEN
                RETURN QUERY SELECT * FROM {schema}.replayed(
                    p_tenant, p_stream, p_expected, p_ids, p_types, p_versions, p_payloads);
                RETURN;
            END IF;
        END;
    END LOOP;
END
$fn$;
