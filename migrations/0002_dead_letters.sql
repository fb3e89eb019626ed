-- Messages a worker could not apply (undecodable, unknown version, refused by the database on
-- every attempt). They arrive on the dead-letter queue with the reason in a header; the treasury
-- process archives them here so operators can list and replay them.
CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    routing_key  text NOT NULL,
    reason       text NOT NULL,
    payload      bytea NOT NULL,
    message_id   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz
);
