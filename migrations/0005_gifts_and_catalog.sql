-- Gifts between players: the giver's partition moves the amount to the hot "transit" account in
-- the giver's journal; a follow-up in the receiver's partition moves it from transit to the
-- receiver. Transit's balance is the value of gifts on their way, and it balances in the audit
-- like every hot account.
INSERT INTO system_owners (id, name) VALUES ('00000000-0000-0000-0000-000000000004', 'transit');

INSERT INTO accounts (owner_id, owner_kind, asset, is_hot)
SELECT '00000000-0000-0000-0000-000000000004', 'system', code, true FROM assets
ON CONFLICT (owner_id, asset) DO NOTHING;

-- A journal entry is reversed at most once: the primary key says so, whatever command asks.
CREATE TABLE reversals (
    journal_id  uuid PRIMARY KEY REFERENCES journal_entries (id),
    reversal_id uuid NOT NULL UNIQUE REFERENCES journal_entries (id)
);
