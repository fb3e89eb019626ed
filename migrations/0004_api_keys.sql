-- API keys for game backends. Only a SHA-256 hash of the secret is stored: the secret is 256
-- random bits, so a fast hash is as strong as a slow one and keeps every request cheap. The key
-- is shown once, when it is created.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    secret_hash text NOT NULL,
    scopes      text[] NOT NULL CHECK (scopes <@ ARRAY['wallet:credit', 'wallet:debit', 'wallet:read', 'catalog:write', 'admin']::text[]),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
