-- Dynamic consistency boundaries: event tags, the index queries read them
-- by, the locks that serialize conditional appends whose boundaries meet,
-- and the append that takes them.
--
-- events.tags holds an event's tags (sorted; NULL when it has none), so
-- every read gives them back without a join. Adding a column without a
-- default rewrites nothing.
ALTER TABLE {schema}.events ADD COLUMN IF NOT EXISTS tags text[];

-- One row per (event, tag): how a query finds its events, in log order.
CREATE TABLE IF NOT EXISTS {schema}.event_tags (
    tag text NOT NULL,
    transaction_id bigint NOT NULL,
    global_position bigint NOT NULL,
    event_type text NOT NULL,
    CONSTRAINT event_tags_key PRIMARY KEY (tag, transaction_id, global_position)
);

-- The advisory locks of a tagged write, taken in one sorted pass (so two
-- writes cannot deadlock on them) and held until its transaction ends.
-- Keys are hashes of (schema, event type, tag), with the empty type
-- standing for "any type":
--   every tagged event takes (its type, tag) and ('', tag) SHARED: tagged
--     writes never wait for each other;
--   a condition item takes (type, its first tag) for each of its types, or
--     ('', its first tag) when it names none, EXCLUSIVE: it waits for the
--     tagged writes that may match it to end, and they for it.
-- p_tag_items / p_tags: the events' tags, as (1-based event index, tag)
-- pairs; p_types: the events' types; p_condition: the condition's items as
-- [{"types": [...], "tags": [...]}], or NULL.
CREATE OR REPLACE FUNCTION {schema}.lock_tags(
    p_types text[], p_tag_items integer[], p_tags text[], p_condition jsonb)
RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    v_key bigint;
    v_exclusive boolean;
BEGIN
    FOR v_key, v_exclusive IN
        SELECT k.key, bool_or(k.exclusive)
          FROM (SELECT hashtextextended('es-dcb {schema} ' || w.ty || chr(31) || w.tag, 0) AS key,
                       false AS exclusive
                  FROM (SELECT p_types[t.i] AS ty, t.tag FROM unnest(p_tag_items, p_tags) AS t(i, tag)
                        UNION ALL
                        SELECT '', t.tag FROM unnest(p_tag_items, p_tags) AS t(i, tag)) w
                UNION ALL
                SELECT hashtextextended('es-dcb {schema} ' || coalesce(ty.v, '') || chr(31) || (q.item->'tags'->>0), 0),
                       true
                  FROM jsonb_array_elements(coalesce(p_condition, '[]'::jsonb)) AS q(item)
                  LEFT JOIN LATERAL jsonb_array_elements_text(q.item->'types') AS ty(v) ON true) k
         GROUP BY k.key
         ORDER BY k.key
    LOOP
        IF v_exclusive THEN
            PERFORM pg_advisory_xact_lock(v_key);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(v_key);
        END IF;
    END LOOP;
END
$fn$;

-- Appends a batch of tagged events to one stream, optionally on a
-- condition, in one call: the locks (lock_tags), then the replay check,
-- then the condition, then the insert, each statement in a snapshot taken
-- after the locks, so at READ COMMITTED the condition sees every write it
-- waited for. Outcomes as append_events, and 3: the boundary moved (an
-- event matching p_condition is after (p_after_tx, p_after_position), or
-- exists at all when p_after_tx is NULL; out_event is that event). A
-- conditional append refuses to run at a stronger isolation level, whose
-- older snapshot would not see what it waited for.
CREATE OR REPLACE FUNCTION {schema}.append_tagged(
    p_tenant text, p_stream text, p_expected bigint,
    p_ids uuid[], p_types text[], p_versions integer[], p_payloads text[], p_metadata text[],
    p_tag_items integer[], p_tags text[],
    p_condition jsonb, p_after_tx bigint, p_after_position bigint)
RETURNS TABLE (outcome integer, out_version bigint, out_tx bigint, out_position bigint, out_event uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_n integer := coalesce(cardinality(p_ids), 0);
    v_actual bigint;
    v_tx bigint;
    v_last bigint;
    v_moved uuid;
BEGIN
    IF p_condition IS NOT NULL AND current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'a conditional append needs READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported';
    END IF;
    PERFORM {schema}.lock_tags(p_types, p_tag_items, p_tags, p_condition);
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
        v_tx := pg_current_xact_id()::text::bigint;
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
