//! The wallet's domain: assets, system owners and the named limits of commands.

use uuid::Uuid;

/// The premium currency.
pub const GEMS: &str = "GEMS";

/// Owner of the negative side of the initial supply.
pub const GENESIS_OWNER_ID: Uuid = Uuid::from_u128(1);
/// Issues GEMS for top-ups and bonuses and receives GEMS from purchases. A hot account.
pub const TREASURY_OWNER_ID: Uuid = Uuid::from_u128(2);
/// Issues items. A hot account.
pub const SHOP_OWNER_ID: Uuid = Uuid::from_u128(3);

/// Holds gifts between the giver's journal and the receiver's. A hot account.
pub const TRANSIT_OWNER_ID: Uuid = Uuid::from_u128(4);

/// The largest quantity of one item a single purchase may buy.
pub const PURCHASE_QUANTITY_MAX: i64 = 1_000;

/// The id of the journal entry that issues the initial supply to the treasury.
pub const GENESIS_JOURNAL_ID: Uuid = Uuid::from_u128(0x6e6e_5e5e_0000_0000_0000_0000_0000_0001);

/// Maps a catalog item name (`gold_coin`) to the inventory field the seed's front end reads.
pub fn seed_inventory_field(asset: &str) -> Option<&'static str> {
    match asset {
        "GOLD_COIN" => Some("goldCoins"),
        "TREASURE_BOX" => Some("treasureBoxes"),
        _ => None,
    }
}

/// The seed-compatible view of a player's wallet, used by `GET /balance` and by every command
/// result that reports the new balance, so the two never disagree in shape.
/// `holdings` are (asset, balance) pairs; missing seed items count as zero.
pub fn balance_view(
    username: &str,
    referral_code: &str,
    holdings: &[(String, i64)],
    version: i64,
) -> serde_json::Value {
    let mut inventory = serde_json::Map::new();
    inventory.insert("goldCoins".to_string(), 0.into());
    inventory.insert("treasureBoxes".to_string(), 0.into());
    let mut gems = 0;
    for (asset, balance) in holdings {
        if asset == GEMS {
            gems = *balance;
        } else if let Some(field) = seed_inventory_field(asset) {
            inventory.insert(field.to_string(), (*balance).into());
        } else {
            inventory.insert(asset.to_lowercase(), (*balance).into());
        }
    }
    serde_json::json!({
        "username": username,
        "balance": gems,
        "referralCode": referral_code,
        "inventory": inventory,
        "version": version,
    })
}

/// A JSON error body in the service's one error shape.
pub fn error_body(code: &str, message: &str, request_id: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "error": message, "code": code, "request_id": request_id })
}
