-- Group commit: several appends, to any streams, in one call and so in one
-- transaction and one commit. Each append is decided exactly as
-- append_events decides it (guarded, so a race with a concurrent append is
-- settled inside); a refused append (outcome 2, 10..13) does not stop the
-- others. p_counts holds the number of events of each append; the event
-- arrays hold the appends' events one after the other. Callers pass the
-- appends sorted by stream, so that two groups touching the same streams
-- take their row locks in the same order and cannot deadlock.
CREATE OR REPLACE FUNCTION {schema}.append_group(
    p_streams text[], p_expected bigint[], p_counts integer[],
    p_ids uuid[], p_types text[], p_versions integer[], p_payloads text[], p_metadata text[])
RETURNS TABLE (item integer, outcome integer, out_version bigint, out_tx bigint, out_position bigint, out_event uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_from integer := 1;
    v_to integer;
BEGIN
    FOR k IN 1 .. coalesce(cardinality(p_streams), 0) LOOP
        v_to := v_from + p_counts[k] - 1;
        RETURN QUERY SELECT k, a.outcome, a.out_version, a.out_tx, a.out_position, a.out_event
          FROM {schema}.append_events('', p_streams[k], p_expected[k],
                p_ids[v_from:v_to], p_types[v_from:v_to], p_versions[v_from:v_to],
                p_payloads[v_from:v_to], p_metadata[v_from:v_to], true) AS a;
        v_from := v_to + 1;
    END LOOP;
END
$fn$;
