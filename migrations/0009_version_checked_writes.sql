-- A check that fails the statement it is part of.
--
-- A worker may apply a batch without a transaction: it reads the accounts unlocked, decides,
-- then writes everything in one statement that updates each changed account only if its
-- version is still the one it read (worker/src/apply.rs, `Locking::Versions`). If another
-- apply changed an account in between, that statement must write nothing at all: its other
-- parts (journal entries, postings, command results, hot credits) must not land without the
-- balances. Data-modifying CTEs always run to completion, so the statement calls this function
-- on the count of accounts it updated, and the raised error rolls all of it back.
--
-- SQLSTATE 40001 (serialization_failure) says what happened: a concurrent change, to be retried.
CREATE FUNCTION wallet_require(condition boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF condition IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = message;
    END IF;
    RETURN true;
END
$$;
