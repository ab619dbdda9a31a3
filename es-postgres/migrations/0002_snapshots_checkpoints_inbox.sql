-- Aggregate snapshots: the latest per stream.
CREATE TABLE IF NOT EXISTS {schema}.snapshots (
    tenant text NOT NULL DEFAULT '',
    stream_id text NOT NULL,
    version bigint NOT NULL,
    schema_version integer NOT NULL,
    state json NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT snapshots_key PRIMARY KEY (tenant, stream_id)
);

-- Named positions in the global log (projections, relays).
CREATE TABLE IF NOT EXISTS {schema}.checkpoints (
    name text NOT NULL PRIMARY KEY,
    major bigint NOT NULL,
    minor bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Message ids a consumer has processed, for exactly-once effects.
CREATE TABLE IF NOT EXISTS {schema}.inbox (
    consumer text NOT NULL,
    message_id uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_key PRIMARY KEY (consumer, message_id)
);
