-- Reads by query that wait only for the writers of their own boundary.
--
-- A read by query tries the exclusive locks of its query's keys (the keys
-- a condition on that query takes). When it gets them, no transaction is
-- writing an event that matches the query, and any that writes one later
-- takes its locks after the read: the read then gives every matching event
-- its snapshot sees, held back by the horizon or not, and its marker need
-- not stay below the transactions that hold the horizon back. When another
-- transaction holds one of the keys, the read is the horizon read of
-- 0004 instead (the caller sees no row and reads that way).
--
-- Both functions look rows up by key only, and run with enable_seqscan off:
-- a long-lived connection keeps the plans it made of their statements (a
-- PL/pgSQL function's plans are cached per session) until the tables'
-- statistics change, and plans made while the log was nearly empty scan
-- it, on every call, while autovacuum is late or off.
--
-- A later writer's events must land after such a read's marker. A
-- transaction that takes its tag locks before it has a transaction id gets
-- one after them, above the xmax of every snapshot taken before (the
-- marker's base). A transaction that had its id before it took its tag
-- locks (it wrote something else first) writes its tagged events with the
-- position major max(its id, the xmax of a snapshot taken after the locks,
-- minus one): never below a marker given while it did not hold the locks,
-- and never above what the horizon passes once it has ended.

-- The locks of a tagged write or of a condition, as 0004 describes them,
-- with the keys hashed by the caller (the store's Rust code, the only
-- writer of tagged events): p_keys sorted and distinct, p_exclusive the
-- mode of each. One statement takes them all, in p_keys' order.
DROP FUNCTION IF EXISTS {schema}.lock_tags(text[], integer[], text[], jsonb);

CREATE OR REPLACE FUNCTION {schema}.lock_tags(p_keys bigint[], p_exclusive boolean[])
RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM CASE WHEN u.e THEN pg_advisory_xact_lock(u.k) ELSE pg_advisory_xact_lock_shared(u.k) END
       FROM unnest(p_keys, p_exclusive) AS u(k, e);
END
$fn$;

-- A page of the events matching p_query after (p_after_tx,
-- p_after_position), in log order, with the xmax of the snapshot it was
-- read in: one row at least (an empty page is one row of NULL event
-- columns), or no row at all when another transaction holds one of the
-- query's keys (p_keys: the exclusive keys of a condition on p_query).
-- Each item is looked up by its first tag, as 0004's reads.
CREATE OR REPLACE FUNCTION {schema}.read_by_query(
    p_keys bigint[], p_query jsonb, p_after_tx bigint, p_after_position bigint, p_limit bigint)
RETURNS TABLE (snapshot_xmax bigint, global_position bigint, transaction_id bigint, stream_id text,
               stream_version bigint, event_id uuid, event_type text, schema_version integer,
               payload text, metadata text, recorded_at timestamptz, tags text[])
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
#variable_conflict use_column
BEGIN
    IF NOT coalesce((SELECT bool_and(pg_try_advisory_xact_lock(k)) FROM unnest(p_keys) AS k), true) THEN
        RETURN;
    END IF;
    -- A statement after the locks: its snapshot sees every commit of the
    -- writers they waited out.
    RETURN QUERY
    SELECT s.xm, e.* FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xm) s
      LEFT JOIN LATERAL
           (SELECT ev.* FROM
              (SELECT DISTINCT m.transaction_id, m.global_position
                 FROM jsonb_array_elements(p_query) AS q(item)
                 CROSS JOIN LATERAL
                   (SELECT t.transaction_id, t.global_position FROM {schema}.event_tags t
                     WHERE t.tag = q.item->'tags'->>0
                       AND (jsonb_array_length(q.item->'types') = 0 OR q.item->'types' ? t.event_type)
                       AND (t.transaction_id, t.global_position) > (p_after_tx, p_after_position)
                       AND (jsonb_array_length(q.item->'tags') = 1
                            OR (SELECT x.tags FROM {schema}.events x WHERE x.transaction_id = t.transaction_id
                                  AND x.global_position = t.global_position)
                               @> ARRAY(SELECT jsonb_array_elements_text(q.item->'tags')))
                     ORDER BY t.transaction_id, t.global_position LIMIT p_limit) m
                ORDER BY 1, 2 LIMIT p_limit) k
            CROSS JOIN LATERAL
              (SELECT x.global_position, x.transaction_id, x.stream_id, x.stream_version, x.event_id,
                      x.event_type, x.schema_version, x.payload::text, x.metadata::text, x.recorded_at, x.tags
                 FROM {schema}.events x WHERE x.transaction_id = k.transaction_id
                  AND x.global_position = k.global_position LIMIT 1) ev
            ORDER BY ev.transaction_id, ev.global_position) e ON true;
END
$fn$;

-- 0004's append_tagged, with the lock keys (p_keys, p_exclusive) from the
-- caller and the position major above: one transaction id for a write
-- that locked first, the bound above for one that had its id before its
-- locks (it takes keys here, and its transaction has an id already; a
-- caller that took every key before its transaction had one passes none).
-- Such a write needs READ COMMITTED, where a statement's snapshot is taken
-- after the locks before it.
DROP FUNCTION IF EXISTS {schema}.append_tagged(
    text, text, bigint, uuid[], text[], integer[], text[], text[], integer[], text[], jsonb, bigint, bigint);

CREATE OR REPLACE FUNCTION {schema}.append_tagged(
    p_tenant text, p_stream text, p_expected bigint,
    p_ids uuid[], p_types text[], p_versions integer[], p_payloads text[], p_metadata text[],
    p_tag_items integer[], p_tags text[], p_keys bigint[], p_exclusive boolean[],
    p_condition jsonb, p_after_tx bigint, p_after_position bigint)
RETURNS TABLE (outcome integer, out_version bigint, out_tx bigint, out_position bigint, out_event uuid)
LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
DECLARE
    v_n integer := coalesce(cardinality(p_ids), 0);
    v_early boolean := coalesce(cardinality(p_keys), 0) > 0
                       AND pg_current_xact_id_if_assigned() IS NOT NULL;
    v_actual bigint;
    v_tx bigint;
    v_last bigint;
    v_moved uuid;
BEGIN
    IF (p_condition IS NOT NULL OR v_early)
       AND current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'a conditional append, or a tagged append after other writes in its transaction, needs READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported';
    END IF;
    PERFORM {schema}.lock_tags(p_keys, p_exclusive);
    IF v_n > 0 AND EXISTS (SELECT 1 FROM {schema}.events e WHERE e.event_id = ANY (p_ids)) THEN
        RETURN QUERY SELECT * FROM {schema}.replayed(
            p_tenant, p_stream, p_expected, p_ids, p_types, p_versions, p_payloads);
        RETURN;
    END IF;
    IF p_condition IS NOT NULL THEN
        -- Each item looked up by its first tag, in a LATERAL with a
        -- LIMIT: an index scan per item.
        SELECT m.event_id INTO v_moved
          FROM jsonb_array_elements(p_condition) AS q(item)
          CROSS JOIN LATERAL
               (SELECT x.event_id
                  FROM {schema}.event_tags t
                  CROSS JOIN LATERAL
                       (SELECT e.event_id, e.tags FROM {schema}.events e
                         WHERE e.transaction_id = t.transaction_id
                           AND e.global_position = t.global_position LIMIT 1) x
                 WHERE t.tag = q.item->'tags'->>0
                   AND (jsonb_array_length(q.item->'types') = 0 OR q.item->'types' ? t.event_type)
                   AND (t.transaction_id, t.global_position)
                       > (coalesce(p_after_tx, -1), coalesce(p_after_position, -1))
                   AND x.tags @> ARRAY(SELECT jsonb_array_elements_text(q.item->'tags'))
                 LIMIT 1) m
         LIMIT 1;
        IF FOUND THEN
            RETURN QUERY SELECT 3, NULL::bigint, NULL::bigint, NULL::bigint, v_moved;
            RETURN;
        END IF;
    END IF;
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
            RETURN QUERY SELECT 2, v_actual, NULL::bigint, NULL::bigint, NULL::uuid;
            RETURN;
        END IF;
        IF v_n = 0 THEN
            RETURN QUERY SELECT 1, v_actual, NULL::bigint, NULL::bigint, NULL::uuid;
            RETURN;
        END IF;
        IF v_early THEN
            v_tx := greatest(pg_current_xact_id()::text::bigint,
                             pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1);
        ELSE
            v_tx := pg_current_xact_id()::text::bigint;
        END IF;
        BEGIN
            WITH inserted AS (
                INSERT INTO {schema}.events (transaction_id, tenant, stream_id, stream_version,
                                            event_id, event_type, schema_version, payload, metadata, tags)
                SELECT v_tx, p_tenant, p_stream, v_actual + u.i, u.id, u.ty, u.sv, u.pl::json, u.md::json,
                       (SELECT array_agg(DISTINCT t.tag ORDER BY t.tag)
                          FROM unnest(p_tag_items, p_tags) AS t(i, tag) WHERE t.i = u.i)
                  FROM unnest(p_ids, p_types, p_versions, p_payloads, p_metadata)
                       WITH ORDINALITY AS u(id, ty, sv, pl, md, i)
                 ORDER BY u.i
                RETURNING transaction_id, global_position, event_type, tags
            ), indexed AS (
                INSERT INTO {schema}.event_tags (tag, transaction_id, global_position, event_type)
                SELECT g.tag, i.transaction_id, i.global_position, i.event_type
                  FROM inserted i CROSS JOIN LATERAL unnest(i.tags) AS g(tag)
            )
            SELECT max(global_position) INTO v_last FROM inserted;
            RETURN QUERY SELECT 0, v_actual + v_n, v_tx, v_last, NULL::uuid;
            RETURN;
        EXCEPTION WHEN unique_violation THEN
            -- A concurrent append took these versions, or committed these
            -- ids just now: decide again.
            IF EXISTS (SELECT 1 FROM {schema}.events e WHERE e.event_id = ANY (p_ids)) THEN
                RETURN QUERY SELECT * FROM {schema}.replayed(
                    p_tenant, p_stream, p_expected, p_ids, p_types, p_versions, p_payloads);
                RETURN;
            END IF;
        END;
    END LOOP;
END
$fn$;
