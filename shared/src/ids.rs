//! Deterministic ids. A command id is derived from (principal, idempotency key), so a retry
//! through any layer maps to the same command; derived ids (the user created by a signup, the
//! follow-up a command owes) are derived from the command id.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// Namespace of every v5 id this service derives.
const NAMESPACE: Uuid = Uuid::from_u128(0x8d3c_52b1_6a4f_4e0b_9b7e_6c1d_2f3a_4b5c);

pub fn command_id(principal: &str, idempotency_key: &str) -> Uuid {
    let mut name = Vec::with_capacity(principal.len() + idempotency_key.len() + 1);
    name.extend_from_slice(principal.as_bytes());
    name.push(b'\n');
    name.extend_from_slice(idempotency_key.as_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

/// An id derived from another id and a purpose ("user", "referrer-bonus", ...).
pub fn derived_id(parent: Uuid, purpose: &str) -> Uuid {
    let mut name = parent.as_bytes().to_vec();
    name.extend_from_slice(purpose.as_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

/// The fingerprint of a request: HMAC-SHA256 keyed with the server secret over the command kind
/// and its canonical fields. Keyed so that a stored fingerprint reveals nothing about secrets
/// (a signup's password) to anyone reading the database.
pub fn fingerprint(secret: &[u8], kind: &str, canonical_fields: &[&str]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(kind.as_bytes());
    for field in canonical_fields {
        mac.update(&[0]);
        mac.update(field.as_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_id_depends_on_principal_and_key() {
        let a = command_id("player:1", "k");
        assert_eq!(a, command_id("player:1", "k"));
        assert_ne!(a, command_id("player:2", "k"));
        assert_ne!(a, command_id("player:1", "k2"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(command_id("ab", "c"), command_id("a", "bc"));
    }

    #[test]
    fn fingerprint_separates_fields() {
        let s = b"secret";
        assert_eq!(
            fingerprint(s, "top_up", &["5"]),
            fingerprint(s, "top_up", &["5"])
        );
        assert_ne!(
            fingerprint(s, "top_up", &["5"]),
            fingerprint(s, "top_up", &["6"])
        );
        assert_ne!(
            fingerprint(s, "x", &["ab", "c"]),
            fingerprint(s, "x", &["a", "bc"])
        );
        assert_ne!(
            fingerprint(s, "x", &["a"]),
            fingerprint(b"other", "x", &["a"])
        );
    }
}
