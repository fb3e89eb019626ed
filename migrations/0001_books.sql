-- The books: users, accounts per owner and asset, journal entries, postings, commands with their
-- stored results, the item catalog, and the not-yet-folded credits of hot system accounts.
-- Only the worker writes player balances; only the treasury consumer writes hot balances.

CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE assets (
    code        text PRIMARY KEY CHECK (code ~ '^[A-Z][A-Z0-9_]{0,31}$'),
    description text NOT NULL
);

INSERT INTO assets (code, description) VALUES
    ('GEMS', 'Premium currency (the seed''s diamonds)'),
    ('GOLD_COIN', 'Shop item: gold coin'),
    ('TREASURE_BOX', 'Shop item: treasure box');

-- The shop's catalog. Prices are in minor units of price_asset. Old journal entries keep the
-- price they were applied with in their postings, so changing a price never rewrites history.
CREATE TABLE items (
    item        text PRIMARY KEY CHECK (item ~ '^[a-z][a-z0-9_]{0,31}$'),
    asset       text NOT NULL UNIQUE REFERENCES assets (code),
    price_asset text NOT NULL REFERENCES assets (code),
    price       bigint NOT NULL CHECK (price > 0),
    active      boolean NOT NULL DEFAULT true
);

INSERT INTO items (item, asset, price_asset, price) VALUES
    ('gold_coin', 'GOLD_COIN', 'GEMS', 10),
    ('treasure_box', 'TREASURE_BOX', 'GEMS', 50);

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.-]{3,32}$'),
    password_hash text NOT NULL,
    referral_code text NOT NULL UNIQUE,
    referred_by   uuid REFERENCES users (id),
    role          text NOT NULL DEFAULT 'player' CHECK (role IN ('player', 'admin')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT nobody_refers_themselves CHECK (referred_by IS NULL OR referred_by <> id)
);

-- Usernames are unique regardless of case, so "Alice" cannot impersonate "alice".
CREATE UNIQUE INDEX users_username_lower ON users (lower(username));

-- Owners that are not players. Their ids are fixed so every process agrees on them.
CREATE TABLE system_owners (
    id   uuid PRIMARY KEY,
    name text NOT NULL UNIQUE
);

INSERT INTO system_owners (id, name) VALUES
    ('00000000-0000-0000-0000-000000000001', 'genesis'),
    ('00000000-0000-0000-0000-000000000002', 'treasury'),
    ('00000000-0000-0000-0000-000000000003', 'shop');

CREATE TABLE accounts (
    id         bigserial PRIMARY KEY,
    owner_id   uuid NOT NULL,
    owner_kind text NOT NULL CHECK (owner_kind IN ('player', 'system')),
    asset      text NOT NULL REFERENCES assets (code),
    balance    bigint NOT NULL DEFAULT 0,
    -- A hot account's balance is maintained by the treasury consumer from hot_credits.
    is_hot     boolean NOT NULL DEFAULT false,
    version    bigint NOT NULL DEFAULT 0,
    UNIQUE (owner_id, asset),
    -- The last line of defence: the database itself refuses a negative player balance.
    CONSTRAINT player_balance_not_negative CHECK (owner_kind <> 'player' OR balance >= 0)
);

-- genesis holds the negative side of the initial supply; treasury and shop are hot.
INSERT INTO accounts (owner_id, owner_kind, asset, is_hot)
SELECT o.id, 'system', a.code, o.name <> 'genesis'
FROM system_owners o CROSS JOIN assets a;

-- One row per command ever applied or rejected, with the result the client got first.
CREATE TABLE commands (
    id          uuid PRIMARY KEY,
    principal   text NOT NULL,
    kind        text NOT NULL,
    fingerprint text NOT NULL,
    partition   integer NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('applied', 'rejected')),
    status_code smallint NOT NULL,
    body        jsonb NOT NULL,
    request_id  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX commands_principal ON commands (principal, created_at);

-- Commands the gateway accepted (202) before their result was known, so their status can be
-- polled as "pending" until the worker stores the result.
CREATE TABLE command_receipts (
    id         uuid PRIMARY KEY,
    principal  text NOT NULL,
    kind       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One journal entry per command that moves value; its id is the command id.
CREATE TABLE journal_entries (
    id         uuid PRIMARY KEY,
    kind       text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE postings (
    id         bigserial PRIMARY KEY,
    journal_id uuid NOT NULL REFERENCES journal_entries (id),
    account_id bigint NOT NULL REFERENCES accounts (id),
    asset      text NOT NULL REFERENCES assets (code),
    amount     bigint NOT NULL CHECK (amount <> 0)
);

CREATE INDEX postings_journal ON postings (journal_id);
CREATE INDEX postings_account ON postings (account_id, id);

-- Credits (signed) owed to hot accounts whose postings are committed but which the treasury
-- consumer has not folded into the cached balance yet. Deleting a row is folding it, which makes
-- folding exactly-once by construction.
CREATE TABLE hot_credits (
    id         bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    amount     bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Messages owed after a commit (follow-up commands). Written in the command's transaction,
-- published before the command is acknowledged, and republished by a sweep if still unpublished.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    command_id   uuid NOT NULL,
    routing_key  text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE INDEX outbox_by_command ON outbox (command_id);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
