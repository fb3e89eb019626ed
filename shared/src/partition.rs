//! The partition of a player: FNV-1a (64-bit) over the 16 bytes of the player id, modulo the
//! number of partitions. FNV-1a is fixed by its specification, so the mapping never changes
//! between builds, platforms or languages. Test vectors below pin it.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64-bit hash of `bytes`.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition (0..partitions) that owns every command of this player.
pub fn partition_of(player_id: uuid::Uuid, partitions: u16) -> u16 {
    let partitions = u64::from(partitions.max(1));
    // The remainder is below `partitions`, which fits in u16.
    u16::try_from(fnv1a_64(player_id.as_bytes()) % partitions).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn fnv1a_matches_published_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partition_vectors_are_stable() {
        // Computed independently (Python, FNV-1a 64 over the UUID's 16 bytes, then modulo).
        let cases = [
            ("00000000-0000-0000-0000-000000000000", 16, 5),
            ("0192f3a0-0000-7000-8000-000000000001", 16, 14),
            ("6f1c2a8e-9b3d-4c5e-8f70-1a2b3c4d5e6f", 16, 4),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", 16, 5),
            ("0192f3a0-0000-7000-8000-000000000001", 7, 5),
            ("00000000-0000-0000-0000-000000000000", 7, 0),
        ];
        for (id, partitions, expected) in cases {
            let id: Uuid = id.parse().unwrap();
            assert_eq!(
                partition_of(id, partitions),
                expected,
                "{id} over {partitions}"
            );
        }
    }

    #[test]
    fn partitions_spread_evenly() {
        let mut counts = [0u32; 16];
        for i in 0..16_000u128 {
            counts[partition_of(Uuid::from_u128(i * 7_919 + 13), 16) as usize] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "uneven spread: {counts:?}");
        }
    }
}
