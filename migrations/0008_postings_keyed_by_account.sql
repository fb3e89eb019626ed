-- Postings keyed by (account_id, id) instead of id alone, with one index fewer.
--
-- Postings had three B-tree indexes: the primary key on id, postings_account on (account_id, id)
-- and postings_journal on journal_id. Nothing looks a posting up by its id alone: the history
-- pages and the chaos checks read an account's postings in id order (postings_account), and
-- reversals read a journal entry's postings (postings_journal). Since id is unique, so is
-- (account_id, id), and that pair can be the primary key and serve the account reads by
-- itself. A purchase writes four postings, so this is four index entries fewer per purchase, out
-- of fourteen (BENCHMARKS.md, profile item 34).
--
-- What the old key guarded stays guaranteed: every id comes from the postings_id_seq sequence
-- (no writer sets it), so no two postings share an id.
ALTER TABLE postings DROP CONSTRAINT postings_pkey;
ALTER TABLE postings ADD CONSTRAINT postings_pkey PRIMARY KEY (account_id, id);
DROP INDEX postings_account;
