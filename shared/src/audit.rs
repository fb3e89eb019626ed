//! The audit: checks every invariant of the books at any time and reports each with its
//! figures. It reads inside one REPEATABLE READ transaction so all checks see one snapshot.

use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditCheck {
    pub name: &'static str,
    pub description: &'static str,
    pub passed: bool,
    /// Rows that break the invariant (0 when it passes).
    pub violations: i64,
    /// Figures that support the verdict, in minor units (an object or a list, per check).
    #[schema(value_type = Value)]
    pub figures: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditReport {
    pub passed: bool,
    pub checked_at: chrono::DateTime<chrono::Utc>,
    pub checks: Vec<AuditCheck>,
}

pub async fn run(pool: &PgPool) -> Result<AuditReport, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *transaction)
        .await?;
    let mut checks = Vec::new();

    let (unbalanced, journals): (i64, i64) = sqlx::query_as(
        "SELECT
             (SELECT count(*) FROM (SELECT 1 FROM postings GROUP BY journal_id, asset HAVING sum(amount) <> 0) bad),
             (SELECT count(*) FROM journal_entries)",
    )
    .fetch_one(&mut *transaction)
    .await?;
    checks.push(AuditCheck {
        name: "journals_balance",
        description: "the postings of every journal entry sum to zero per asset",
        passed: unbalanced == 0,
        violations: unbalanced,
        figures: serde_json::json!({ "journal_entries": journals }),
    });

    let (mismatched, accounts): (i64, i64) = sqlx::query_as(
        "WITH sums AS (SELECT account_id, sum(amount) AS total FROM postings GROUP BY account_id)
         SELECT count(*) FILTER (WHERE a.balance <> coalesce(s.total, 0)), count(*)
         FROM accounts a LEFT JOIN sums s ON s.account_id = a.id
         WHERE NOT a.is_hot",
    )
    .fetch_one(&mut *transaction)
    .await?;
    checks.push(AuditCheck {
        name: "account_balances_match_postings",
        description: "every non-hot account's balance equals the sum of its postings",
        passed: mismatched == 0,
        violations: mismatched,
        figures: serde_json::json!({ "accounts_checked": accounts }),
    });

    let hot: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "WITH sums AS (SELECT account_id, sum(amount) AS total FROM postings GROUP BY account_id),
              pending AS (SELECT account_id, sum(amount) AS total FROM hot_credits GROUP BY account_id)
         SELECT o.name, a.asset, a.balance,
                coalesce(p.total, 0)::bigint, coalesce(s.total, 0)::bigint
         FROM accounts a
         JOIN system_owners o ON o.id = a.owner_id
         LEFT JOIN sums s ON s.account_id = a.id
         LEFT JOIN pending p ON p.account_id = a.id
         WHERE a.is_hot
         ORDER BY o.name, a.asset",
    )
    .fetch_all(&mut *transaction)
    .await?;
    let hot_bad = hot
        .iter()
        .filter(|(_, _, balance, pending, postings)| {
            i128::from(*balance) + i128::from(*pending) != i128::from(*postings)
        })
        .count();
    checks.push(AuditCheck {
        name: "hot_balances_match_postings",
        description: "every hot account's balance plus its not-yet-folded credits equals the sum of its postings",
        passed: hot_bad == 0,
        violations: i64::try_from(hot_bad).unwrap_or(i64::MAX),
        figures: serde_json::Value::Array(
            hot.iter()
                .map(|(owner, asset, balance, pending, postings)| {
                    serde_json::json!({
                        "owner": owner, "asset": asset, "balance": balance,
                        "unfolded_credits": pending, "postings_sum": postings,
                    })
                })
                .collect(),
        ),
    });

    let totals: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT a.code,
                coalesce((SELECT sum(balance) FROM accounts WHERE asset = a.code), 0)::bigint,
                coalesce((SELECT sum(h.amount) FROM hot_credits h JOIN accounts x ON x.id = h.account_id
                          WHERE x.asset = a.code), 0)::bigint
         FROM assets a ORDER BY a.code",
    )
    .fetch_all(&mut *transaction)
    .await?;
    let totals_bad = totals
        .iter()
        .filter(|(_, balances, pending)| i128::from(*balances) + i128::from(*pending) != 0)
        .count();
    checks.push(AuditCheck {
        name: "assets_sum_to_zero",
        description: "per asset, all balances plus all not-yet-folded credits sum to zero",
        passed: totals_bad == 0,
        violations: i64::try_from(totals_bad).unwrap_or(i64::MAX),
        figures: serde_json::Value::Array(
            totals
                .iter()
                .map(|(asset, balances, pending)| {
                    serde_json::json!({ "asset": asset, "balances_sum": balances, "unfolded_credits": pending })
                })
                .collect(),
        ),
    });

    // The postings and hot credits have no foreign keys to accounts (see migration 0006), so
    // the audit checks what those keys would have, and more: the asset matches too.
    let (orphan_postings, orphan_credits): (i64, i64) = sqlx::query_as(
        "SELECT
             (SELECT count(*) FROM postings p LEFT JOIN accounts a ON a.id = p.account_id
              WHERE a.id IS NULL OR a.asset <> p.asset),
             (SELECT count(*) FROM hot_credits h LEFT JOIN accounts a ON a.id = h.account_id
              WHERE a.id IS NULL OR NOT a.is_hot)",
    )
    .fetch_one(&mut *transaction)
    .await?;
    checks.push(AuditCheck {
        name: "postings_reference_their_accounts",
        description: "every posting names an existing account of its asset, and every unfolded credit an existing hot account",
        passed: orphan_postings == 0 && orphan_credits == 0,
        violations: orphan_postings.saturating_add(orphan_credits),
        figures: serde_json::json!({ "orphan_postings": orphan_postings, "orphan_credits": orphan_credits }),
    });

    // Nor from postings to journal entries (migration 0007).
    let orphan_legs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM postings p
         WHERE NOT EXISTS (SELECT 1 FROM journal_entries j WHERE j.id = p.journal_id)",
    )
    .fetch_one(&mut *transaction)
    .await?;
    checks.push(AuditCheck {
        name: "postings_reference_their_journals",
        description: "every posting belongs to an existing journal entry",
        passed: orphan_legs == 0,
        violations: orphan_legs,
        figures: serde_json::json!({ "orphan_postings": orphan_legs }),
    });

    let (negative, players): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE balance < 0), count(*) FROM accounts WHERE owner_kind = 'player'",
    )
    .fetch_one(&mut *transaction)
    .await?;
    checks.push(AuditCheck {
        name: "no_negative_player_balance",
        description: "no player account is below zero",
        passed: negative == 0,
        violations: negative,
        figures: serde_json::json!({ "player_accounts": players }),
    });

    transaction.commit().await?;
    Ok(AuditReport {
        passed: checks.iter().all(|check| check.passed),
        checked_at: chrono::Utc::now(),
        checks,
    })
}
