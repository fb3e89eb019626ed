//! The audit finds postings and unfolded credits whose account is missing or of another asset,
//! and postings whose journal entry is missing, which foreign keys no longer refuse (migrations
//! 0006 and 0007 dropped them for throughput).

use shared::domain::{GEMS, TREASURY_OWNER_ID};

#[tokio::test]
async fn the_audit_finds_postings_without_their_account() {
    let config = shared::testing::isolated_config(1);
    // Drops the database even if an assertion below fails.
    let mut cleanup = shared::testing::Cleanup::new(&config);
    let pool = shared::db::bootstrap(&config).await.expect("database");
    let report = shared::audit::run(&pool).await.expect("audit ran");
    assert!(report.passed, "a fresh database passes");

    let treasury = treasury_gems_account(&pool).await;
    let journal = uuid::Uuid::new_v4();
    // A balanced journal entry whose second leg names an account that does not exist.
    sqlx::query("INSERT INTO journal_entries (id, kind) VALUES ($1, 'top_up')")
        .bind(journal)
        .execute(&pool)
        .await
        .expect("journal");
    post_balanced_legs(&pool, journal, treasury, i64::MAX).await;
    // And an unfolded credit owed to an account that does not exist.
    sqlx::query("INSERT INTO hot_credits (account_id, amount) VALUES ($1, 1)")
        .bind(i64::MAX - 1)
        .execute(&pool)
        .await
        .expect("credit");

    let report = shared::audit::run(&pool).await.expect("audit ran");
    assert!(!report.passed);
    let check = report
        .checks
        .iter()
        .find(|check| check.name == "postings_reference_their_accounts")
        .expect("the check runs");
    assert!(!check.passed);
    assert_eq!(check.violations, 2, "{:?}", check.figures);
    pool.close().await;
    cleanup.run().await;
}

#[tokio::test]
async fn the_audit_finds_postings_without_their_journal_entry() {
    let config = shared::testing::isolated_config(1);
    // Drops the database even if an assertion below fails.
    let mut cleanup = shared::testing::Cleanup::new(&config);
    let pool = shared::db::bootstrap(&config).await.expect("database");
    let treasury = treasury_gems_account(&pool).await;
    // Two balanced legs on an existing account of their asset (refused by no foreign key now),
    // naming a journal entry that was never written: only the journal check can see them.
    post_balanced_legs(&pool, uuid::Uuid::new_v4(), treasury, treasury).await;

    let report = shared::audit::run(&pool).await.expect("audit ran");
    assert!(!report.passed);
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|check| !check.passed)
        .map(|check| check.name)
        .collect();
    assert_eq!(failed, ["postings_reference_their_journals"]);
    let check = report
        .checks
        .iter()
        .find(|check| check.name == "postings_reference_their_journals")
        .expect("the check runs");
    assert_eq!(check.violations, 2, "{:?}", check.figures);
    pool.close().await;
    cleanup.run().await;
}

async fn treasury_gems_account(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT id FROM accounts WHERE owner_id = $1 AND asset = $2")
        .bind(TREASURY_OWNER_ID)
        .bind(GEMS)
        .fetch_one(pool)
        .await
        .expect("treasury account")
}

/// Posts -5 GEMS to `debited` and +5 GEMS to `credited` under `journal`.
async fn post_balanced_legs(pool: &sqlx::PgPool, journal: uuid::Uuid, debited: i64, credited: i64) {
    sqlx::query(
        "INSERT INTO postings (journal_id, account_id, asset, amount)
         VALUES ($1, $2, $4, -5), ($1, $3, $4, 5)",
    )
    .bind(journal)
    .bind(debited)
    .bind(credited)
    .bind(GEMS)
    .execute(pool)
    .await
    .expect("postings");
}
