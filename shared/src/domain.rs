//! The wallet's domain: assets, system owners and the named limits of commands.

use uuid::Uuid;

use crate::results::{ErrorBody, Inventory, Wallet, to_body};

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
pub fn wallet_view(
    username: &str,
    referral_code: &str,
    holdings: &[(String, i64)],
    version: i64,
) -> Wallet {
    let mut inventory = Inventory::default();
    let mut gems = 0;
    for (asset, balance) in holdings {
        match asset.as_str() {
            GEMS => gems = *balance,
            // The seed's two items have fields of their own (see `seed_inventory_field`).
            "GOLD_COIN" => inventory.gold_coins = *balance,
            "TREASURE_BOX" => inventory.treasure_boxes = *balance,
            _ => {
                inventory.other.insert(asset.to_lowercase(), *balance);
            }
        }
    }
    Wallet {
        username: username.to_string(),
        balance: gems,
        referral_code: referral_code.to_string(),
        inventory,
        version,
    }
}

/// [`wallet_view`] as JSON.
pub fn balance_view(
    username: &str,
    referral_code: &str,
    holdings: &[(String, i64)],
    version: i64,
) -> serde_json::Value {
    to_body(&wallet_view(username, referral_code, holdings, version))
}

/// A JSON error body in the service's one error shape.
pub fn error_body(code: &str, message: &str, request_id: Option<&str>) -> serde_json::Value {
    to_body(&ErrorBody::new(code, message, request_id))
}
