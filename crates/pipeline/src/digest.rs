//! Content digests for the loop's `DONE` markers: FNV-1a with 128 bits over canonical JSON.
//! Not cryptographic — it detects changed inputs (config, pool, dev set), not forgery.

use serde::Serialize;

const FNV128_OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
const FNV128_PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

/// FNV-1a (128-bit) of `bytes`.
pub fn fnv1a128(bytes: &[u8]) -> u128 {
    let mut h = FNV128_OFFSET;
    for &b in bytes {
        h ^= u128::from(b);
        h = h.wrapping_mul(FNV128_PRIME);
    }
    h
}

/// `"fnv1a128:" + 32 hex digits` of `value`'s JSON. serde_json writes struct fields in
/// declaration order and maps in key order (no `preserve_order`), so equal values give equal
/// text.
pub fn digest_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let text = serde_json::to_vec(value)?;
    Ok(format!("fnv1a128:{:032x}", fnv1a128(&text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Reference values of FNV-1a 128 (draft-eastlake-fnv).
        assert_eq!(fnv1a128(b""), FNV128_OFFSET);
        assert_eq!(fnv1a128(b"a"), 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
    }

    #[test]
    fn digests_follow_content() {
        let a = digest_json(&serde_json::json!({"x": [1, 2], "y": "z"})).unwrap();
        let b = digest_json(&serde_json::json!({"y": "z", "x": [1, 2]})).unwrap();
        let c = digest_json(&serde_json::json!({"x": [2, 1], "y": "z"})).unwrap();
        assert_eq!(a, b, "map key order does not matter");
        assert_ne!(a, c);
        assert!(a.starts_with("fnv1a128:") && a.len() == 9 + 32, "{a}");
    }
}
