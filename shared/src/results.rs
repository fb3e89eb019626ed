//! The JSON bodies commands answer with. Workers build them, the gateway passes them through
//! unchanged (and stores nothing of its own), and the OpenAPI document takes its schemas from
//! these types, so the three cannot drift apart. Field names are camelCase, as the seed's front
//! end reads them; amounts are whole numbers (i64) in minor units.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// A player's items as the seed's front end reads them: `goldCoins` and `treasureBoxes` always,
/// and every other item the player holds under its lowercase asset name (`magic_sword`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// Quantity of `GOLD_COIN`.
    pub gold_coins: i64,
    /// Quantity of `TREASURE_BOX`.
    pub treasure_boxes: i64,
    /// Other items, by lowercase asset name.
    #[serde(flatten)]
    pub other: BTreeMap<String, i64>,
}

/// The seed-compatible view of a player's wallet: `GET /balance`, and the body of every command
/// that reports the new balance (top-up, bonus, purchase, gift, reversal).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Wallet {
    pub username: String,
    /// GEMS, in whole units.
    pub balance: i64,
    /// The player's own referral code (12 characters of Crockford base32).
    pub referral_code: String,
    pub inventory: Inventory,
    /// Version of the GEMS account: grows by one with every change of the balance.
    pub version: i64,
}

/// `POST /signup`: the player was created.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignupResult {
    pub user_id: Uuid,
    /// Always `Created`.
    #[schema(example = "Created")]
    pub status: String,
}

/// What one purchase bought.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Purchased {
    /// Catalog name of the item (`gold_coin`).
    pub item: String,
    pub quantity: i64,
    /// Price of one item at the time of the purchase.
    pub unit_price: i64,
    /// unitPrice × quantity, paid in the item's price asset.
    pub total: i64,
}

/// A purchase's result: the new wallet and what was bought.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PurchaseResult {
    #[serde(flatten)]
    pub wallet: Wallet,
    pub purchased: Purchased,
}

/// A gift as its giver (`status: sent`) or, in the delivery's stored result, its receiver
/// (`status: delivered`) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gift {
    pub gift_id: Uuid,
    pub receiver_id: Uuid,
    /// `GEMS` or an item asset (`GOLD_COIN`).
    pub asset: String,
    pub amount: i64,
    /// `sent` (on its way to the receiver) or `delivered`.
    pub status: GiftStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GiftStatus {
    Sent,
    Delivered,
}

/// A gift's result: the giver's new wallet and the gift, delivered to the receiver by a
/// follow-up command (usually within milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct GiftResult {
    #[serde(flatten)]
    pub wallet: Wallet,
    pub gift: Gift,
}

/// The journal entry a reversal undid.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reversed {
    pub journal_id: Uuid,
    /// Kind of the reversed entry (`top_up`, `bonus`, `purchase`, `referral_bonus`).
    pub kind: String,
}

/// A reversal's result: the player's new wallet and the entry it undid.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReversalResult {
    #[serde(flatten)]
    pub wallet: Wallet,
    pub reversed: Reversed,
}

/// The stored result of a referrer's share of a referral bonus (a follow-up command).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReferrerBonusResult {
    pub referrer_id: Uuid,
    pub referee_id: Uuid,
    pub amount: i64,
}

/// The service's one error shape, from the gateway and from workers alike.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// A human sentence.
    pub error: String,
    /// Stable snake_case code (`insufficient_funds`, `invalid_amount`, ...).
    pub code: String,
    /// The `X-Request-Id` of the request that produced this error (for a replayed result, of
    /// the first request); null when there was none.
    #[schema(required = true)]
    pub request_id: Option<String>,
    /// `insufficient_funds` only: the balance there is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    /// `insufficient_funds` only: the amount that was required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<i64>,
    /// `insufficient_funds` of a reversal only: the asset that is short.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
}

impl ErrorBody {
    pub fn new(code: &str, message: &str, request_id: Option<&str>) -> Self {
        Self {
            error: message.to_string(),
            code: code.to_string(),
            request_id: request_id.map(str::to_string),
            balance: None,
            required: None,
            asset: None,
        }
    }
}

/// Serializes a result body (these types cannot fail to serialize).
pub fn to_body(result: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(result).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_keep_their_wire_format() {
        let wallet = Wallet {
            username: "alice".to_string(),
            balance: 90,
            referral_code: "ABC".to_string(),
            inventory: Inventory {
                gold_coins: 1,
                treasure_boxes: 0,
                other: BTreeMap::from([("magic_sword".to_string(), 2)]),
            },
            version: 3,
        };
        let purchase = PurchaseResult {
            wallet,
            purchased: Purchased {
                item: "gold_coin".to_string(),
                quantity: 1,
                unit_price: 10,
                total: 10,
            },
        };
        assert_eq!(
            to_body(&purchase),
            json!({
                "username": "alice", "balance": 90, "referralCode": "ABC", "version": 3,
                "inventory": { "goldCoins": 1, "treasureBoxes": 0, "magic_sword": 2 },
                "purchased": { "item": "gold_coin", "quantity": 1, "unitPrice": 10, "total": 10 },
            })
        );
        assert_eq!(
            to_body(&ErrorBody::new("not_found", "no", None)),
            json!({ "error": "no", "code": "not_found", "request_id": null })
        );
    }
}
