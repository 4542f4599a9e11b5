//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016), built in userspace.
//!
//! Each engine gets a permutation of the ring's slots from two hashes of its id (offset and skip);
//! engines take turns claiming their next free preferred slot until the ring is full. Weights set how
//! often an engine takes a turn: an engine of weight `w` takes `w / max_weight` of the turns, so its
//! share of slots is proportional to its weight. The table depends only on the (id, weight) set — not
//! on the order it is given in — and on nothing random, so every engine and every build computes the
//! same ring. The data plane reads `ring[hash % size]`; userspace writes only the slots that change.

use crate::{hash::murmur3_words, maps::ENGINE_NONE};

const SEED_OFFSET: u32 = 0x6d61_676c; // "magl"
const SEED_SKIP: u32 = 0x6576_3121; // "ev1!"

/// One ring member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub engine_id: u32,
    pub weight: u32,
}

/// Builds a ring of `size` slots (a prime) over `members`. Members of weight 0 are left out; with no
/// member left every slot is [`ENGINE_NONE`].
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    assert!(size >= 3, "ring size must be a prime of at least 3");
    let mut members: Vec<Member> = members.iter().copied().filter(|m| m.weight > 0).collect();
    members.sort_by_key(|m| m.engine_id);
    members.dedup_by_key(|m| m.engine_id);

    let size_usize = size as usize;
    let mut ring = vec![ENGINE_NONE; size_usize];
    let Some(max_weight) = members.iter().map(|m| u64::from(m.weight)).max() else {
        return ring;
    };

    let size64 = u64::from(size);
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|m| {
            let offset = u64::from(murmur3_words(&[m.engine_id], SEED_OFFSET)) % size64;
            let skip = u64::from(murmur3_words(&[m.engine_id], SEED_SKIP)) % (size64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut target = vec![0u64; members.len()];
    let mut filled = 0usize;
    let mut turn = 1u64;
    while filled < size_usize {
        for (i, m) in members.iter().enumerate() {
            if turn * u64::from(m.weight) < target[i] {
                continue;
            }
            target[i] += max_weight;
            let (offset, skip) = perms[i];
            loop {
                // The permutation visits every slot once in `size` steps (size is prime, skip < size).
                #[allow(clippy::cast_possible_truncation)]
                let slot = ((offset + next[i] * skip) % size64) as usize;
                next[i] += 1;
                if ring[slot] == ENGINE_NONE {
                    ring[slot] = m.engine_id;
                    filled += 1;
                    break;
                }
            }
            if filled == size_usize {
                break;
            }
        }
        turn += 1;
    }
    ring
}

/// The slots whose engine differs between `old` and `new`, as `(slot, new engine)`.
pub fn diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    assert_eq!(old.len(), new.len(), "rings of different sizes");
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (o, n))| o != n)
        .map(|(slot, (_, n))| (u32::try_from(slot).expect("ring slot fits u32"), *n))
        .collect()
}

/// Whether `n` is prime (ring sizes must be).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::maps::RING_SIZE;

    fn members(spec: &[(u32, u32)]) -> Vec<Member> {
        spec.iter()
            .map(|&(engine_id, weight)| Member { engine_id, weight })
            .collect()
    }

    fn shares(ring: &[u32]) -> HashMap<u32, f64> {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for e in ring {
            *counts.entry(*e).or_default() += 1;
        }
        #[allow(clippy::cast_precision_loss)]
        counts
            .into_iter()
            .map(|(e, c)| (e, c as f64 / ring.len() as f64))
            .collect()
    }

    #[test]
    fn equal_weights_share_within_one_percent() {
        for n in [2u32, 3, 4, 5, 7, 16] {
            let ring = build(
                &members(&(1..=n).map(|i| (i, 1)).collect::<Vec<_>>()),
                RING_SIZE,
            );
            let s = shares(&ring);
            assert_eq!(s.len(), n as usize);
            for (e, share) in s {
                let want = 1.0 / f64::from(n);
                assert!(
                    (share - want).abs() < 0.01,
                    "n={n} engine {e}: share {share:.4}, want {want:.4}"
                );
            }
        }
    }

    #[test]
    fn weighted_shares_within_one_percent() {
        let spec = [(1, 1), (2, 2), (3, 3), (10, 4)];
        let ring = build(&members(&spec), RING_SIZE);
        let s = shares(&ring);
        for (id, w) in spec {
            let want = f64::from(w) / 10.0;
            assert!(
                (s[&id] - want).abs() < 0.01,
                "engine {id}: share {:.4}, want {want:.4}",
                s[&id]
            );
        }
    }

    #[test]
    fn every_slot_is_filled_and_zero_weight_is_left_out() {
        let ring = build(&members(&[(1, 1), (2, 0), (3, 5)]), RING_SIZE);
        assert!(ring.iter().all(|e| *e == 1 || *e == 3));
        assert!(build(&[], RING_SIZE).iter().all(|e| *e == ENGINE_NONE));
    }

    /// Removing one of N engines must move that engine's slots (1/N of the ring) and Maglev moves a
    /// little more. The bound asserted: at most 1/N + 2 percentage points of the ring.
    #[test]
    fn removing_one_engine_moves_about_one_nth() {
        for n in [3u32, 4, 5, 8] {
            let before = build(
                &members(&(1..=n).map(|i| (i, 1)).collect::<Vec<_>>()),
                RING_SIZE,
            );
            let after = build(
                &members(&(1..n).map(|i| (i, 1)).collect::<Vec<_>>()),
                RING_SIZE,
            );
            let moved = diff(&before, &after).len();
            #[allow(clippy::cast_precision_loss)]
            let frac = moved as f64 / f64::from(RING_SIZE);
            let ideal = 1.0 / f64::from(n);
            assert!(
                frac >= ideal - 0.005,
                "n={n}: moved {frac:.4} < ideal {ideal:.4}"
            );
            assert!(
                frac <= ideal + 0.02,
                "n={n}: moved {frac:.4}, bound {:.4}",
                ideal + 0.02
            );
            // Slots of the removed engine all moved; no slot moved to a removed engine.
            assert!(before.iter().zip(&after).all(|(b, a)| *b != n || *a != n));
        }
    }

    #[test]
    fn adding_one_engine_moves_about_one_over_n_plus_one() {
        let before = build(&members(&[(1, 1), (2, 1), (3, 1)]), RING_SIZE);
        let after = build(&members(&[(1, 1), (2, 1), (3, 1), (4, 1)]), RING_SIZE);
        let changes = diff(&before, &after);
        #[allow(clippy::cast_precision_loss)]
        let frac = changes.len() as f64 / f64::from(RING_SIZE);
        assert!((0.245..=0.27).contains(&frac), "moved {frac:.4}");
        assert!(changes.iter().filter(|(_, e)| *e == 4).count() * 100 / changes.len() >= 90);
    }

    #[test]
    fn independent_of_member_order_and_repeatable() {
        let a = build(&members(&[(1, 2), (7, 1), (3, 3)]), RING_SIZE);
        let b = build(&members(&[(3, 3), (1, 2), (7, 1)]), RING_SIZE);
        assert_eq!(a, b);
        // Pinned fingerprint: identical tables across runs and builds.
        let fingerprint = murmur3_words(&a, 0);
        assert_eq!(fingerprint, PINNED_FINGERPRINT, "Maglev table changed");
    }
    const PINNED_FINGERPRINT: u32 = 1_275_754_901;

    #[test]
    fn diff_lists_only_changed_slots() {
        assert_eq!(diff(&[1, 2, 3], &[1, 4, 3]), vec![(1, 4)]);
        assert!(diff(&[1, 2], &[1, 2]).is_empty());
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(13) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }
}
