//! A pool of backend servers and the choice of backend for a new connection.
//!
//! [`Pool::pick`] returns only a backend that [`Backend::is_usable`] says may take new connections
//! (enabled, of non-zero weight, healthy) and `None` when no backend is usable, so a down backend gets
//! no new connections and the proxy can refuse the client at once. `pick` takes `&self` and is called
//! from many tasks at once: round robin and least connections are lock-free (one atomic cursor),
//! weighted round robin holds a mutex for one pass over the backends, and consistent hashing reads an
//! immutable table and touches a lock only for clients whose backend is down.
//!
//! The algorithms:
//! - **Round robin**: the `k`-th usable backend, `k` = an atomic cursor modulo the number of usable
//!   backends, so every usable backend gets an equal share whatever its weight, and a down backend's
//!   turn is not handed wholesale to its neighbour.
//! - **Weighted round robin**: nginx's smooth weighted round robin. Each pick adds every usable
//!   backend's weight to its `current`, takes the largest `current` (lowest index on ties) and takes
//!   the total weight off the winner. A change of the usable set resets every `current` to 0 and
//!   starts a new cycle. Within a stable usable set, every `W = Σ weights` consecutive picks from the
//!   start of a cycle give each backend exactly `weight` picks, and the picks are interleaved: after
//!   any `n` picks no backend is ahead of its ideal `n · weight / W` by a whole pick (its `current`
//!   never falls to `-W`), so a heavy backend cannot take its share in a burst (weights 5, 1, 1 give
//!   `a a b a c a a`, not `a a a a a b c`). A light backend may lag its ideal by a little more than
//!   one pick when many backends compete for the same turns.
//! - **Least connections**: the usable backend with the smallest `active / weight` (compared as
//!   `active_i · weight_j < active_j · weight_i`, no floats); among equally loaded backends an atomic
//!   cursor picks each in turn, so a burst of connections arriving before any of them is counted
//!   spreads instead of piling onto the first backend.
//! - **Consistent hash**: weighted Maglev ([`lb_common::maglev`]) keyed by
//!   [`client_hash`] of the client address, member id = the backend's position in the pool. Two tables:
//!   the *base* table over the backends the configuration makes usable (enabled, weight > 0), built
//!   once, never locked; and a *fallback* table over the backends usable now, consulted only when the
//!   client's base backend is down. So when a backend goes down exactly its clients move (spread over
//!   the others by weight), clients of every other backend stay where they are (plain Maglev over the
//!   usable set would also shuffle a few percent of them), and they all return when it comes back. The
//!   fallback table remembers the usable set it was built for; a pick compares it with the live
//!   set (one pass of atomic loads) and rebuilds it under the write lock only when it changed.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use lb_common::{
    ENGINE_NONE,
    addr::ip_be,
    hash::client_hash,
    maglev::{self, Member},
};

use crate::{
    backend::Backend,
    config::{Algorithm, PoolConfig},
};

/// Maglev table sizes, smallest first. A pool uses the first that is at least
/// [`SLOTS_PER_BACKEND`] × its number of backends (the last one beyond that).
///
/// Maglev's balance depends on slots per backend: every backend gets its weighted share of the slots
/// to within about one slot, so at 100 slots per backend (the paper keeps `M > 100 N`) a share is off
/// by ~1% of itself. Pools are usually small, so the usual table is 4099 slots = 16 KiB per table (two
/// per pool), built in ~0.15 ms (release, 40 backends) while the write lock holds off only the picks of
/// clients whose backend is down; the data plane's 65537 (256 KiB, 1-6 ms to build) is kept for pools
/// of more than 164 backends.
pub const RING_SIZES: [u32; 3] = [4099, 16411, 65537];

/// Slots per backend a pool's Maglev table is sized for.
pub const SLOTS_PER_BACKEND: usize = 100;

/// Picks of a consistent-hash pool that retry when the usable set changes under them.
const HASH_ATTEMPTS: usize = 4;

/// The Maglev table size for a pool of `backends` backends.
pub fn ring_size_for(backends: usize) -> u32 {
    RING_SIZES
        .into_iter()
        .find(|&m| m as usize >= backends.saturating_mul(SLOTS_PER_BACKEND))
        .unwrap_or(RING_SIZES[RING_SIZES.len() - 1])
}

/// A pool of backends and its selection state.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    /// In configuration order: `backends[i].index == i`.
    pub backends: Vec<Arc<Backend>>,
    /// Round robin and least-connections tie-breaking.
    cursor: AtomicUsize,
    /// Smooth weighted round robin.
    wrr: Mutex<WrrState>,
    /// Consistent hashing (present only for that algorithm).
    hash: Option<HashState>,
}

impl Pool {
    /// A pool of fresh backends (healthy, no connections), `index` = position in `cfg.backends`.
    pub fn new(cfg: &PoolConfig) -> Pool {
        Pool::build(cfg, std::collections::HashMap::new())
    }

    /// The pool `cfg` describes, edited from `old`: a backend whose address and port `old` has is the
    /// same object with its new position, weight and enabled flag, so its health, counters and open
    /// connections carry over an edit of the pool; others are new.
    pub fn carry_over(cfg: &PoolConfig, old: &Pool) -> Pool {
        Pool::build(
            cfg,
            old.backends.iter().map(|b| (b.addr, b.clone())).collect(),
        )
    }

    /// The pool `cfg` describes, reusing the backends of `previous` by address.
    fn build(
        cfg: &PoolConfig,
        mut previous: std::collections::HashMap<std::net::SocketAddr, Arc<Backend>>,
    ) -> Pool {
        let backends = cfg
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let index = u32::try_from(i).expect("backend count fits u32");
                match previous.remove(&b.socket_addr()) {
                    Some(kept) => {
                        kept.reconfigure(index, b.weight, b.enabled);
                        kept
                    }
                    None => Arc::new(Backend::new(index, b.socket_addr(), b.weight, b.enabled)),
                }
            })
            .collect();
        Pool::with_backends(cfg.name.clone(), cfg.algorithm, backends)
    }

    /// A pool over existing backends (e.g. to keep their live state across a reload). Consistent
    /// hashing identifies a backend by its position in `backends`.
    pub fn with_backends(name: String, algorithm: Algorithm, backends: Vec<Arc<Backend>>) -> Pool {
        let hash = (algorithm == Algorithm::ConsistentHash).then(|| HashState::new(&backends));
        Pool {
            name,
            algorithm,
            wrr: Mutex::new(WrrState {
                current: vec![0; backends.len()],
                usable: vec![false; backends.len()],
            }),
            backends,
            cursor: AtomicUsize::new(0),
            hash,
        }
    }

    /// The backend for a new connection from `client`: always a usable one, `None` when no backend
    /// is usable.
    pub fn pick(&self, client: IpAddr) -> Option<Arc<Backend>> {
        match self.algorithm {
            Algorithm::RoundRobin => self.pick_round_robin(),
            Algorithm::WeightedRoundRobin => self.pick_weighted_round_robin(),
            Algorithm::LeastConnections => self.pick_least_connections(),
            Algorithm::ConsistentHash => self.pick_consistent_hash(client),
        }
    }

    /// Backends that may take new connections now.
    pub fn usable(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter().filter(|b| b.is_usable())
    }

    fn pick_round_robin(&self) -> Option<Arc<Backend>> {
        let usable = self.usable().count();
        if usable == 0 {
            return None;
        }
        let k = self.cursor.fetch_add(1, Ordering::Relaxed) % usable;
        // The usable set may change between the count and this pass: then take any usable one.
        self.usable()
            .nth(k)
            .or_else(|| self.usable().next())
            .cloned()
    }

    fn pick_weighted_round_robin(&self) -> Option<Arc<Backend>> {
        let mut state = self.wrr.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        // A change of the usable set starts a new cycle: nobody keeps credit earned against a
        // different total.
        let mut changed = false;
        for (b, was) in self.backends.iter().zip(state.usable.iter_mut()) {
            let now = b.is_usable();
            changed |= now != *was;
            *was = now;
        }
        if changed {
            state.current.fill(0);
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, b) in self.backends.iter().enumerate() {
            if !state.usable[i] {
                continue;
            }
            let w = i64::from(b.weight());
            state.current[i] += w;
            total += w;
            if best.is_none_or(|j| state.current[i] > state.current[j]) {
                best = Some(i);
            }
        }
        let best = best?;
        state.current[best] -= total;
        Some(Arc::clone(&self.backends[best]))
    }

    fn pick_least_connections(&self) -> Option<Arc<Backend>> {
        // `a` lighter than `b`: a.active / a.weight < b.active / b.weight() (weights are > 0 here).
        let load = |b: &Backend| {
            (
                u128::from(b.active.load(Ordering::Relaxed)),
                u128::from(b.weight()),
            )
        };
        let mut best: Option<(&Arc<Backend>, (u128, u128))> = None;
        let mut minima = 0usize;
        for b in self.usable() {
            let (a, w) = load(b);
            match best {
                Some((_, (ba, bw))) if a * bw > ba * w => {}
                Some((_, (ba, bw))) if a * bw == ba * w => minima += 1,
                _ => {
                    best = Some((b, (a, w)));
                    minima = 1;
                }
            }
        }
        let (first, (ba, bw)) = best?;
        if minima > 1 {
            let k = self.cursor.fetch_add(1, Ordering::Relaxed) % minima;
            let at_minimum = || {
                self.usable().filter(|b| {
                    let (a, w) = load(b);
                    a * bw == ba * w
                })
            };
            // Counts move under us: if the k-th tie is gone, the first minimum found will do.
            if let Some(b) = at_minimum().nth(k) {
                return Some(Arc::clone(b));
            }
        }
        Some(Arc::clone(first))
    }

    fn pick_consistent_hash(&self, client: IpAddr) -> Option<Arc<Backend>> {
        let state = self
            .hash
            .as_ref()
            .expect("consistent-hash state of a consistent-hash pool");
        let slot = state.slot(client);
        if let Some(b) = self.member(state.base[slot])
            && b.is_usable()
        {
            return Some(Arc::clone(b));
        }
        // Its backend is down (or the configuration leaves none usable): the fallback table.
        for _ in 0..HASH_ATTEMPTS {
            let table = self.fallback_table(state);
            let b = self.member(table.ring[slot])?;
            if b.is_usable() {
                return Some(Arc::clone(b));
            }
            // It went down after the table was checked: the next round rebuilds.
        }
        None
    }

    fn member(&self, id: u32) -> Option<&Arc<Backend>> {
        if id == ENGINE_NONE {
            return None;
        }
        self.backends.get(id as usize)
    }

    /// The fallback table for the current usable set, rebuilt if the set changed since it was built.
    fn fallback_table(&self, state: &HashState) -> Arc<HashTable> {
        let current = |t: &Option<Arc<HashTable>>| {
            t.as_ref()
                .filter(|t| t.is_current(&self.backends))
                .map(Arc::clone)
        };
        if let Some(t) = current(
            &state
                .fallback
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            return t;
        }
        let mut slot = state
            .fallback
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // Another pick may have rebuilt it while this one waited for the lock.
        if let Some(t) = current(&slot) {
            return t;
        }
        let usable: Vec<bool> = self.backends.iter().map(|b| b.is_usable()).collect();
        let t = Arc::new(HashTable::build(&self.backends, usable, state.size));
        *slot = Some(Arc::clone(&t));
        t
    }
}

/// Smooth weighted round robin state, per backend.
#[derive(Debug)]
struct WrrState {
    /// nginx's `current_weight`.
    current: Vec<i64>,
    /// Usable at the previous pick.
    usable: Vec<bool>,
}

/// Consistent-hashing state of a pool.
#[derive(Debug)]
struct HashState {
    size: u32,
    /// Maglev over the backends the configuration makes usable (enabled, weight > 0); never changes.
    base: Vec<u32>,
    /// Maglev over the backends usable when it was built; built on first need.
    fallback: RwLock<Option<Arc<HashTable>>>,
}

impl HashState {
    fn new(backends: &[Arc<Backend>]) -> HashState {
        let size = ring_size_for(backends.len());
        let configured = backends
            .iter()
            .map(|b| b.enabled() && b.weight() > 0)
            .collect();
        HashState {
            size,
            base: HashTable::build(backends, configured, size).ring,
            fallback: RwLock::new(None),
        }
    }

    fn slot(&self, client: IpAddr) -> usize {
        (client_hash(&ip_be(client).1) % self.size) as usize
    }
}

/// A Maglev table and the set of backends it was built over.
#[derive(Debug)]
struct HashTable {
    members: Vec<bool>,
    ring: Vec<u32>,
}

impl HashTable {
    fn build(backends: &[Arc<Backend>], members: Vec<bool>, size: u32) -> HashTable {
        let list: Vec<Member> = backends
            .iter()
            .zip(&members)
            .enumerate()
            .filter(|(_, (_, m))| **m)
            .map(|(i, (b, _))| Member {
                engine_id: u32::try_from(i).expect("backend count fits u32"),
                weight: b.weight(),
            })
            .collect();
        HashTable {
            ring: maglev::build(&list, size),
            members,
        }
    }

    /// Built over exactly the backends usable now.
    fn is_current(&self, backends: &[Arc<Backend>]) -> bool {
        backends
            .iter()
            .zip(&self.members)
            .all(|(b, m)| b.is_usable() == *m)
    }
}

#[cfg(test)]
mod carry_over_tests {
    use super::*;
    use crate::config::BackendConfig;

    fn cfg(backends: &[(&str, u32, bool)]) -> PoolConfig {
        PoolConfig {
            name: "web".into(),
            algorithm: Algorithm::WeightedRoundRobin,
            backends: backends
                .iter()
                .map(|(a, w, e)| BackendConfig {
                    address: a.parse().unwrap(),
                    port: 80,
                    weight: *w,
                    enabled: *e,
                })
                .collect(),
            health_check: None,
        }
    }

    #[test]
    fn an_edit_keeps_health_counters_and_connections_of_kept_backends() {
        let old = Pool::new(&cfg(&[("10.0.0.1", 1, true), ("10.0.0.2", 1, true)]));
        old.backends[1].set_healthy(false);
        let open = old.backends[0].open();
        old.backends[0]
            .bytes_to_client
            .fetch_add(100, std::sync::atomic::Ordering::Relaxed);
        // One weight changed, a backend added in front, one kept in another position.
        let new = Pool::carry_over(
            &cfg(&[
                ("10.0.0.3", 1, true),
                ("10.0.0.2", 5, true),
                ("10.0.0.1", 2, false),
            ]),
            &old,
        );
        assert!(Arc::ptr_eq(&new.backends[1], &old.backends[1]));
        assert!(Arc::ptr_eq(&new.backends[2], &old.backends[0]));
        assert!(
            !new.backends[1].is_healthy(),
            "still down: the health check said so"
        );
        assert_eq!((new.backends[1].weight(), new.backends[1].index()), (5, 1));
        let kept = &new.backends[2];
        assert_eq!((kept.weight(), kept.enabled(), kept.index()), (2, false, 2));
        assert_eq!(kept.active.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(
            kept.bytes_to_client
                .load(std::sync::atomic::Ordering::Relaxed),
            100
        );
        drop(open);
        assert_eq!(kept.active.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(new.backends[0].is_healthy(), "a new backend starts up");
        // Only the usable one of the kept backends and the new one are picked.
        let picked: std::collections::HashSet<_> = (0..12)
            .map(|_| new.pick("192.0.2.1".parse().unwrap()).unwrap().addr)
            .collect();
        assert_eq!(
            picked.len(),
            1,
            "10.0.0.2 is down and 10.0.0.1 disabled: {picked:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{Ipv4Addr, Ipv6Addr},
        sync::atomic::AtomicBool,
        thread,
    };

    use super::*;
    use crate::config::BackendConfig;

    const ALL: [Algorithm; 4] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::ConsistentHash,
    ];

    /// A pool of `(weight, enabled)` backends at 10.0.0.(i+1):80.
    fn pool(algorithm: Algorithm, spec: &[(u32, bool)]) -> Pool {
        let backends = spec
            .iter()
            .enumerate()
            .map(|(i, &(weight, enabled))| BackendConfig {
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, u8::try_from(i + 1).unwrap())),
                port: 80,
                weight,
                enabled,
            })
            .collect();
        Pool::new(&PoolConfig {
            name: "p".into(),
            algorithm,
            backends,
            health_check: None,
        })
    }

    fn weights(n: usize) -> Vec<(u32, bool)> {
        vec![(1, true); n]
    }

    /// Deterministic pseudo-random client addresses (splitmix64), one in eight IPv6.
    fn clients(n: usize) -> Vec<IpAddr> {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (0..n)
            .map(|_| {
                let r = next();
                if r % 8 == 0 {
                    IpAddr::V6(Ipv6Addr::from((u128::from(next()) << 64) | u128::from(r)))
                } else {
                    IpAddr::V4(Ipv4Addr::from((r >> 32) as u32))
                }
            })
            .collect()
    }

    fn client() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    /// Picks `n` times (one client each from `clients`, or always the same one), counting per index.
    fn counts(p: &Pool, picks: &[IpAddr]) -> Vec<usize> {
        let mut c = vec![0; p.backends.len()];
        for ip in picks {
            c[p.pick(*ip).expect("a usable backend").index() as usize] += 1;
        }
        c
    }

    #[test]
    fn ring_sizes_are_primes_sized_by_backend_count() {
        assert!(RING_SIZES.into_iter().all(maglev::is_prime));
        assert_eq!(ring_size_for(1), 4099);
        assert_eq!(ring_size_for(40), 4099);
        assert_eq!(ring_size_for(41), 16411);
        assert_eq!(ring_size_for(1000), 65537);
    }

    #[test]
    fn new_indexes_backends_by_position() {
        let p = pool(Algorithm::RoundRobin, &[(3, true), (0, true), (1, false)]);
        assert_eq!(p.name, "p");
        for (i, b) in p.backends.iter().enumerate() {
            assert_eq!(b.index() as usize, i);
            assert_eq!(b.addr, format!("10.0.0.{}:80", i + 1).parse().unwrap());
        }
        assert_eq!(p.backends[0].weight(), 3);
        assert!(!p.backends[2].enabled());
    }

    /// Backend 0 disabled, 1 of weight 0, 2 unhealthy, 3 and 4 usable: only 3 and 4 are ever picked.
    #[test]
    fn every_algorithm_skips_unusable_backends() {
        let many = clients(2000);
        for alg in ALL {
            let p = pool(
                alg,
                &[(1, false), (0, true), (1, true), (1, true), (2, true)],
            );
            p.backends[2].set_healthy(false);
            let c = counts(&p, &many);
            assert_eq!(&c[..3], &[0, 0, 0], "{alg:?}: {c:?}");
            assert!(c[3] > 0 && c[4] > 0, "{alg:?}: {c:?}");
        }
    }

    #[test]
    fn every_algorithm_returns_none_when_nothing_is_usable() {
        for alg in ALL {
            let p = pool(alg, &[(1, false), (0, true), (1, true)]);
            assert!(p.pick(client()).is_some(), "{alg:?}");
            p.backends[2].set_healthy(false);
            for ip in clients(100) {
                assert!(p.pick(ip).is_none(), "{alg:?}");
            }
            // And it comes back.
            p.backends[2].set_healthy(true);
            assert_eq!(p.pick(client()).unwrap().index(), 2, "{alg:?}");
        }
        for alg in ALL {
            let p = pool(alg, &[]);
            assert!(p.pick(client()).is_none(), "{alg:?}");
        }
    }

    #[test]
    fn round_robin_gives_equal_shares_whatever_the_weights() {
        let p = pool(
            Algorithm::RoundRobin,
            &[(1, true), (5, true), (1, false), (2, true), (9, true)],
        );
        p.backends[3].set_healthy(false);
        // Usable: 0, 1, 4, each exactly once in every three picks.
        let seq: Vec<u32> = (0..9).map(|_| p.pick(client()).unwrap().index()).collect();
        for w in seq.chunks(3) {
            let mut w = w.to_vec();
            w.sort_unstable();
            assert_eq!(w, [0, 1, 4], "{seq:?}");
        }
        assert_eq!(counts(&p, &vec![client(); 3000]), [1000, 1000, 0, 0, 1000]);
    }

    #[test]
    fn weighted_round_robin_is_exactly_proportional_and_smooth() {
        let mut specs = vec![
            vec![5, 1, 1],
            vec![1, 1, 1],
            vec![3, 2],
            vec![7, 4, 2, 1],
            vec![100, 1, 50, 3],
            vec![65535, 1],
        ];
        // And 200 pseudo-random ones: 1 to 8 backends of weights 1..=100.
        let mut r = clients(1600).into_iter().map(|ip| match ip {
            IpAddr::V4(a) => u32::from(a),
            IpAddr::V6(a) => u32::from(a.octets()[15]),
        });
        for _ in 0..200 {
            let n = r.next().unwrap() % 8 + 1;
            specs.push((0..n).map(|_| r.next().unwrap() % 100 + 1).collect());
        }
        for spec in specs {
            let p = pool(
                Algorithm::WeightedRoundRobin,
                &spec.iter().map(|&w| (w, true)).collect::<Vec<_>>(),
            );
            let total: u32 = spec.iter().sum();
            let mut seen = vec![0u64; spec.len()];
            // Three full cycles.
            for n in 1..=3 * u64::from(total) {
                seen[p.pick(client()).unwrap().index() as usize] += 1;
                // Smooth: after any n picks no backend is a whole pick ahead of n·w/W, i.e.
                // count·W − n·w < W.
                for (i, &w) in spec.iter().enumerate() {
                    let lead =
                        i128::from(seen[i]) * i128::from(total) - i128::from(n) * i128::from(w);
                    assert!(
                        lead < i128::from(total),
                        "{spec:?}: after {n} picks backend {i} has {}",
                        seen[i]
                    );
                }
                // Exact over every full cycle.
                if n % u64::from(total) == 0 {
                    let cycles = n / u64::from(total);
                    let want: Vec<u64> = spec.iter().map(|&w| u64::from(w) * cycles).collect();
                    assert_eq!(seen, want, "{spec:?}");
                }
            }
        }
        // nginx's documented sequence for 5, 1, 1.
        let p = pool(
            Algorithm::WeightedRoundRobin,
            &[(5, true), (1, true), (1, true)],
        );
        let seq: Vec<u32> = (0..7).map(|_| p.pick(client()).unwrap().index()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weighted_round_robin_redistributes_a_down_backends_share() {
        let p = pool(
            Algorithm::WeightedRoundRobin,
            &[(2, true), (1, true), (3, true)],
        );
        for _ in 0..5 {
            p.pick(client());
        }
        p.backends[2].set_healthy(false);
        // A new cycle over the remaining weights 2 + 1 starts at once.
        let seq: Vec<u32> = (0..3).map(|_| p.pick(client()).unwrap().index()).collect();
        assert_eq!(seq, [0, 1, 0]);
        assert_eq!(counts(&p, &vec![client(); 3000]), [2000, 1000, 0]);
        // And another when it comes back.
        p.backends[2].set_healthy(true);
        assert_eq!(counts(&p, &[client(); 6]), [2, 1, 3]);
    }

    #[test]
    fn least_connections_picks_the_least_loaded_by_weight() {
        let p = pool(
            Algorithm::LeastConnections,
            &[(1, true), (2, true), (4, true), (1, false)],
        );
        let set = |a: [u64; 4]| {
            for (b, a) in p.backends.iter().zip(a) {
                b.active.store(a, Ordering::Relaxed);
            }
        };
        // Loads 3/1, 5/2, 9/4 → backend 2 (2.25 < 2.5 < 3); the disabled idle one is never chosen.
        set([3, 5, 9, 0]);
        assert_eq!(p.pick(client()).unwrap().index(), 2);
        // 3/1, 5/2, 11/4 → backend 1.
        set([3, 5, 11, 0]);
        assert_eq!(p.pick(client()).unwrap().index(), 1);
        // Unhealthy backends are skipped even when idle.
        set([0, 5, 11, 0]);
        assert_eq!(p.pick(client()).unwrap().index(), 0);
        p.backends[0].set_healthy(false);
        assert_eq!(p.pick(client()).unwrap().index(), 1);
    }

    /// Opening connections as picked keeps active counts proportional to weights; equal loads are
    /// spread over the tied backends in turn.
    #[test]
    fn least_connections_follows_weights_and_spreads_ties() {
        let p = pool(
            Algorithm::LeastConnections,
            &[(1, true), (2, true), (1, true)],
        );
        let mut guards = Vec::new();
        for _ in 0..400 {
            let b = p.pick(client()).unwrap();
            b.total.fetch_add(1, Ordering::Relaxed);
            b.active.fetch_add(1, Ordering::Relaxed);
            guards.push(b);
        }
        let active: Vec<u64> = p
            .backends
            .iter()
            .map(|b| b.active.load(Ordering::Relaxed))
            .collect();
        assert_eq!(active, [100, 200, 100]);

        // All idle and equally weighted: picks that are never opened rotate over all of them.
        let p = pool(
            Algorithm::LeastConnections,
            &[(1, true), (1, true), (1, false), (1, true)],
        );
        let seq: Vec<u32> = (0..6).map(|_| p.pick(client()).unwrap().index()).collect();
        for w in seq.chunks(3) {
            let mut w = w.to_vec();
            w.sort_unstable();
            assert_eq!(w, [0, 1, 3], "{seq:?}");
        }
        // Ties among the least loaded only: backend 1 is busier and never picked.
        p.backends[1].active.store(1, Ordering::Relaxed);
        assert_eq!(counts(&p, &vec![client(); 1000]), [500, 0, 0, 500]);
    }

    #[test]
    fn consistent_hash_keeps_a_client_on_its_backend() {
        let p = pool(Algorithm::ConsistentHash, &weights(5));
        for ip in clients(1000) {
            let first = p.pick(ip).unwrap().index();
            for _ in 0..3 {
                assert_eq!(p.pick(ip).unwrap().index(), first);
            }
            // A pool built from the same configuration agrees (no per-process randomness).
        }
        let q = pool(Algorithm::ConsistentHash, &weights(5));
        for ip in clients(1000) {
            assert_eq!(p.pick(ip).unwrap().index(), q.pick(ip).unwrap().index());
        }
    }

    #[test]
    fn consistent_hash_shares_follow_weights() {
        let many = clients(100_000);
        for spec in [
            vec![1, 1, 1, 1],
            vec![1, 2, 3, 4],
            vec![5, 1, 1],
            vec![10, 0, 30],
        ] {
            let p = pool(
                Algorithm::ConsistentHash,
                &spec.iter().map(|&w| (w, true)).collect::<Vec<_>>(),
            );
            let c = counts(&p, &many);
            let total: u32 = spec.iter().sum();
            for (i, &w) in spec.iter().enumerate() {
                #[allow(clippy::cast_precision_loss)]
                let share = c[i] as f64 / many.len() as f64;
                let want = f64::from(w) / f64::from(total);
                assert!(
                    (share - want).abs() <= 0.05 * want,
                    "{spec:?}: backend {i} share {share:.4}, want {want:.4} ± 5%"
                );
            }
        }
    }

    /// One of four backends goes down: only its clients move (a quarter), spread over the other three;
    /// when it comes back every client is where it was.
    #[test]
    fn consistent_hash_moves_only_the_clients_of_a_down_backend() {
        let many = clients(100_000);
        let p = pool(Algorithm::ConsistentHash, &weights(4));
        let before: Vec<u32> = many.iter().map(|ip| p.pick(*ip).unwrap().index()).collect();

        p.backends[2].set_healthy(false);
        let after: Vec<u32> = many.iter().map(|ip| p.pick(*ip).unwrap().index()).collect();
        let mut moved_to: HashMap<u32, usize> = HashMap::new();
        for (b, a) in before.iter().zip(&after) {
            if *b == 2 {
                assert_ne!(*a, 2);
                *moved_to.entry(*a).or_default() += 1;
            } else {
                assert_eq!(a, b, "a client of a backend that stayed up moved");
            }
        }
        let moved: usize = moved_to.values().sum();
        #[allow(clippy::cast_precision_loss)]
        let frac = moved as f64 / many.len() as f64;
        assert!((0.20..=0.30).contains(&frac), "moved {frac:.4}");
        // Spread evenly over the three equal-weight survivors.
        for b in [0, 1, 3] {
            let n = moved_to[&b];
            assert!(
                n * 3 * 100 >= moved * 90 && n * 3 * 100 <= moved * 110,
                "{moved_to:?}"
            );
        }

        p.backends[2].set_healthy(true);
        let back: Vec<u32> = many.iter().map(|ip| p.pick(*ip).unwrap().index()).collect();
        assert_eq!(back, before);
    }

    #[test]
    fn consistent_hash_rebuilds_only_when_the_usable_set_changes() {
        let p = pool(Algorithm::ConsistentHash, &weights(3));
        let state = p.hash.as_ref().unwrap();
        let t1 = p.fallback_table(state);
        assert!(Arc::ptr_eq(&t1, &p.fallback_table(state)));
        // A weight-0 or disabled backend is never usable: neither is a change.
        p.backends[1].set_healthy(false);
        let t2 = p.fallback_table(state);
        assert!(!Arc::ptr_eq(&t1, &t2));
        assert!(t2.ring.iter().all(|&m| m == 0 || m == 2));
        assert!(Arc::ptr_eq(&t2, &p.fallback_table(state)));
        p.backends[1].set_healthy(true);
        assert!(!Arc::ptr_eq(&t2, &p.fallback_table(state)));
    }

    #[test]
    fn concurrent_picks_while_health_flaps() {
        for alg in ALL {
            let p = Arc::new(pool(alg, &[(1, true), (2, true), (3, true), (1, false)]));
            let stop = Arc::new(AtomicBool::new(false));
            let flapper = {
                let (p, stop) = (Arc::clone(&p), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        p.backends[i % 3].set_healthy(i.is_multiple_of(2));
                        i += 1;
                        thread::yield_now();
                    }
                })
            };
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let p = Arc::clone(&p);
                    thread::spawn(move || {
                        let mut picked = 0usize;
                        for ip in clients(5_000 + t) {
                            if let Some(b) = p.pick(ip) {
                                assert_ne!(b.index(), 3, "the disabled backend");
                                let _g = b.open();
                                picked += 1;
                            }
                        }
                        picked
                    })
                })
                .collect();
            let picked: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
            stop.store(true, Ordering::Relaxed);
            flapper.join().unwrap();
            assert!(picked > 0, "{alg:?}");
            assert!(
                p.backends
                    .iter()
                    .all(|b| b.active.load(Ordering::Relaxed) == 0)
            );
        }
    }
}
