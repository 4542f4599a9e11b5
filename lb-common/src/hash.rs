//! The flow hash: MurmurHash3 (x86, 32-bit) over whole words, identical in the XDP program and in
//! userspace. Hashing the words of a key gives the same result as MurmurHash3 over the key's bytes
//! in little-endian order, so it can be checked against any reference implementation.
//!
//! Deterministic by construction: no random seed, no std hasher, nothing that varies between builds.

use crate::maps::{FlowV4, FlowV6, RING_SIZE};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// Seed of the flow hash. Changing it moves every flow that is not in the connection table.
pub const FLOW_SEED: u32 = 0x4c42_2d31;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_bytes: u32) -> u32 {
    let mut h = h ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3 `x86_32` of `words` (read as their little-endian bytes) with `seed`.
#[inline(always)]
pub fn murmur3_words(words: &[u32], seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < words.len() {
        h = mix(h, words[i]);
        i += 1;
    }
    #[allow(clippy::cast_possible_truncation)]
    finish(h, (words.len() * 4) as u32)
}

/// Hash of an IPv4 flow (client address and port, VIP address and port, protocol).
#[inline(always)]
pub fn flow_hash_v4(f: &FlowV4) -> u32 {
    let h = mix(FLOW_SEED, f.src_be);
    let h = mix(h, f.dst_be);
    let h = mix(h, u32::from(f.sport_be) | (u32::from(f.dport_be) << 16));
    let h = mix(h, u32::from(f.proto));
    finish(h, 16)
}

/// Hash of an IPv6 flow.
#[inline(always)]
pub fn flow_hash_v6(f: &FlowV6) -> u32 {
    let mut h = FLOW_SEED;
    let mut i = 0;
    while i < 4 {
        h = mix(h, f.src_be[i]);
        i += 1;
    }
    let mut i = 0;
    while i < 4 {
        h = mix(h, f.dst_be[i]);
        i += 1;
    }
    let h = mix(h, u32::from(f.sport_be) | (u32::from(f.dport_be) << 16));
    let h = mix(h, u32::from(f.proto));
    finish(h, 40)
}

/// Hash of a client address alone (source-IP persistent virtual services place by client, so every
/// flow of a client lands on one engine even before the persistence table remembers it).
#[inline(always)]
pub fn client_hash(addr_be: &[u32; 4]) -> u32 {
    let h = mix(FLOW_SEED, addr_be[0]);
    let h = mix(h, addr_be[1]);
    let h = mix(h, addr_be[2]);
    let h = mix(h, addr_be[3]);
    finish(h, 16)
}

/// The ring slot a hash selects.
#[inline(always)]
pub const fn ring_slot(hash: u32) -> u32 {
    hash % RING_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference MurmurHash3 `x86_32` over bytes (the canonical algorithm, tail handling included).
    fn murmur3_bytes(data: &[u8], seed: u32) -> u32 {
        let mut h = seed;
        let chunks = data.chunks_exact(4);
        let tail = chunks.remainder();
        for c in chunks {
            h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        if !tail.is_empty() {
            h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        }
        finish(h, u32::try_from(data.len()).unwrap())
    }

    #[test]
    fn matches_published_murmur3_vectors() {
        // Published MurmurHash3_x86_32 test vectors.
        assert_eq!(murmur3_bytes(b"", 0), 0);
        assert_eq!(murmur3_bytes(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_bytes(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_bytes(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_bytes(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_bytes(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    #[test]
    fn word_hash_equals_byte_hash() {
        let words = [0x0102_0304, 0xdead_beef, 7, 0xffff_0000];
        let bytes: Vec<u8> = words.iter().flat_map(|w: &u32| w.to_le_bytes()).collect();
        assert_eq!(murmur3_words(&words, 99), murmur3_bytes(&bytes, 99));
    }

    #[test]
    fn flow_hashes_are_murmur3_of_the_key_words() {
        let f = FlowV4 {
            src_be: 0x0a00_0001,
            dst_be: 0x0a00_0002,
            sport_be: 0x1234,
            dport_be: 0x5000,
            proto: 6,
            _pad: [0; 3],
        };
        let words = [f.src_be, f.dst_be, 0x5000_1234, 6];
        assert_eq!(flow_hash_v4(&f), murmur3_words(&words, FLOW_SEED));

        let g = FlowV6 {
            src_be: [1, 2, 3, 4],
            dst_be: [5, 6, 7, 8],
            sport_be: 9,
            dport_be: 10,
            proto: 17,
            _pad: [0; 3],
        };
        let words = [1, 2, 3, 4, 5, 6, 7, 8, 9 | (10 << 16), 17];
        assert_eq!(flow_hash_v6(&g), murmur3_words(&words, FLOW_SEED));
        assert_eq!(
            client_hash(&[1, 2, 3, 4]),
            murmur3_words(&[1, 2, 3, 4], FLOW_SEED)
        );
    }

    #[test]
    fn hash_is_stable_across_builds() {
        // Pinned values: a change here moves every unrecorded flow in a running fleet.
        let f = FlowV4 {
            src_be: u32::from_ne_bytes([10, 0, 0, 1]),
            dst_be: u32::from_ne_bytes([10, 0, 0, 100]),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        assert_eq!(flow_hash_v4(&f), flow_hash_v4(&f));
        assert_eq!(flow_hash_v4(&f), PINNED_V4);
    }
    const PINNED_V4: u32 = 328_877_460;

    #[test]
    fn ports_spread_evenly_over_four_buckets() {
        let mut buckets = [0u32; 4];
        for port in 1024u16..(1024 + 40_000) {
            let f = FlowV4 {
                src_be: 0x0100_000a,
                dst_be: 0x6400_000a,
                sport_be: port.to_be(),
                dport_be: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            };
            buckets[(ring_slot(flow_hash_v4(&f)) % 4) as usize] += 1;
        }
        for b in buckets {
            assert!((9_500..=10_500).contains(&b), "uneven spread {buckets:?}");
        }
    }
}
