-- Foreign keys from postings and hot credits to accounts and assets, dropped for throughput.
--
-- A foreign-key check takes a KEY SHARE lock on the referenced row. Every purchase posts to the
-- treasury's and the shop's accounts and to the GEMS asset, so every worker transaction
-- share-locked the same few rows: PostgreSQL then builds multixacts for them (visible as
-- GetMultiXactIdMembers in the profile), and each posting paid three SPI lookups on top of its
-- index insert. The profile of the worker alone showed the checks among the largest costs.
--
-- What they guarded stays guaranteed:
-- * accounts and assets are never deleted, and nothing updates an account's id or asset;
-- * the worker takes every account id it posts to from a row it has just locked or read;
-- * the audit's `postings_reference_their_accounts` check finds any posting or hot credit whose
--   account does not exist or holds another asset than the posting.
-- postings.journal_id keeps its foreign key: the journal row is the transaction's own, so that
-- check never contends.
ALTER TABLE postings DROP CONSTRAINT IF EXISTS postings_account_id_fkey;
ALTER TABLE postings DROP CONSTRAINT IF EXISTS postings_asset_fkey;
ALTER TABLE hot_credits DROP CONSTRAINT IF EXISTS hot_credits_account_id_fkey;
