//! Choosing the engine for a flow.
//!
//! Fast path: the connection table (one hash lookup). A recorded flow keeps its engine while that
//! engine is active or draining; its virtual service is found by id in the VS array and checked
//! against the packet's VIP, so an entry of a removed service is never followed. A SYN keeps its
//! entry's engine only while the service's ring names it: a retransmission stays where its first
//! SYN went, a new connection reusing the ports of a flow whose engine has left is placed again.
//! Slow path (a miss, a stale entry, an owner that is down or removed, a SYN to a draining owner
//! or to one the ring no longer names):
//! the VIP table, then source-IP persistence for persistent services, then the Maglev ring.
//! A new flow the ring gives to this host while nothing here listens is placed on the next other
//! engine of the ring (`place_away_*`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    ConnEntry, ENGINE_ACTIVE, ENGINE_DRAINING, ENGINE_MODE_LOCAL, ENGINE_NONE, Engine, FAMILY_V4,
    FAMILY_V6, FlowV4, FlowV6, OwnerQuery, PROTO_UDP, PersistEntry, PersistKey, RING_SIZE, Reason,
    VS_F_ASK_OWNER, VS_F_ASK_OWNER_UDP, VS_F_PERSIST, VS_F_PRIMARY, VipKey, VsEntry,
    hash::{client_hash, flow_hash_v4, flow_hash_v6, ring_slot},
};

use crate::{
    counters::count,
    maps::{CONN_V4, CONN_V6, ENGINES, OWNER_QUERIES, OWNER_QUERY_RATE, PERSIST, RING, VIPS, VS},
};

/// The engine a packet goes to.
pub struct Owner {
    pub vs_id: u32,
    pub engine_id: u32,
    pub engine: Engine,
    /// The flow was placed now (not found in the connection table).
    pub new_flow: bool,
}

/// How a lookup may change the tables.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A packet of the flow itself: record new flows, refresh persistence.
    Record,
    /// An ICMP error about the flow: look up only.
    LookupOnly,
}

#[inline(always)]
fn engine(id: u32) -> Option<Engine> {
    ENGINES.get(id).copied()
}

/// The virtual service `vs_id`, if it still is the one of `vip` and this engine steers it.
#[inline(always)]
fn live_vs(vs_id: u32, vip: &VipKey) -> Option<&'static VsEntry> {
    let vs = VS.get(vs_id)?;
    (vs.vip == *vip && vs.flags & VS_F_PRIMARY != 0).then_some(vs)
}

/// Ring slot → engine. Userspace writes rings before it deactivates an engine and after it
/// activates one, so a ring only names active engines.
#[inline(always)]
fn ring_engine(vs_id: u32, hash: u32) -> Result<(u32, Engine), Reason> {
    ring_engine_at(vs_id, ring_slot(hash))
}

#[inline(always)]
fn ring_engine_at(vs_id: u32, slot: u32) -> Result<(u32, Engine), Reason> {
    let id = *RING
        .get(vs_id * RING_SIZE + slot)
        .ok_or(Reason::DropNoEngine)?;
    if id == ENGINE_NONE {
        return Err(Reason::DropNoEngine);
    }
    match engine(id) {
        Some(e) if e.state == ENGINE_ACTIVE => Ok((id, e)),
        _ => Err(Reason::DropNoEngine),
    }
}

/// A new flow's engine: persistence (for persistent services), else the ring.
#[inline(always)]
fn place(
    vs_id: u32,
    vs: &VsEntry,
    flow_hash: u32,
    client_be: &[u32; 4],
    mode: Mode,
) -> Result<(u32, Engine), Reason> {
    if vs.flags & VS_F_PERSIST == 0 {
        return ring_engine(vs_id, flow_hash);
    }
    let key = PersistKey {
        client_be: *client_be,
        vs_id,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(p) = PERSIST.get_ptr_mut(&key) {
        // SAFETY: a map value pointer from a successful lookup; fields are plain integers.
        let (id, last_used) = unsafe { ((*p).engine_id, (*p).last_used_ns) };
        if now.wrapping_sub(last_used) < u64::from(vs.persist_timeout_s) * 1_000_000_000 {
            if let Some(e) = engine(id) {
                if e.state == ENGINE_ACTIVE {
                    if mode == Mode::Record {
                        // SAFETY: as above.
                        unsafe { (*p).last_used_ns = now };
                    }
                    count(Reason::PersistHit);
                    return Ok((id, e));
                }
            }
        }
    }
    let (id, e) = ring_engine(vs_id, client_hash(client_be))?;
    if mode == Mode::Record {
        let _ = PERSIST.insert(
            &key,
            &PersistEntry {
                engine_id: id,
                _pad: 0,
                last_used_ns: now,
            },
            0,
        );
    }
    Ok((id, e))
}

/// Owner queries per CPU: one every `QUERY_INTERVAL_NS`, bursts of up to `QUERY_BURST`.
const QUERY_INTERVAL_NS: u64 = 20_000;
const QUERY_BURST: u64 = 1024;

/// Hands `q` to the daemon if this CPU is within its query rate and the queue has room.
#[inline(always)]
fn ask_owner(q: &OwnerQuery) -> bool {
    let Some(tat) = OWNER_QUERY_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU array slot; only this CPU writes it while this program runs.
    let t = unsafe { (*tat).max(now) };
    if t - now > QUERY_BURST * QUERY_INTERVAL_NS
        || OWNER_QUERIES.output::<OwnerQuery>(q, 0).is_err()
    {
        return false;
    }
    // SAFETY: as above.
    unsafe { *tat = t + QUERY_INTERVAL_NS };
    true
}

/// Whether an unknown flow of `vs` is to be asked about rather than placed: a TCP segment without
/// SYN (`VS_F_ASK_OWNER`), a UDP datagram right after a promotion (`VS_F_ASK_OWNER_UDP`).
#[inline(always)]
fn ask_about(vs: &VsEntry, non_syn: bool, proto: u8) -> bool {
    (non_syn && vs.flags & VS_F_ASK_OWNER != 0)
        || (proto == PROTO_UDP && vs.flags & VS_F_ASK_OWNER_UDP != 0)
}

macro_rules! owner_fn {
    ($name:ident, $flow:ty, $table:ident, $hash:ident, $client:expr, $query:expr) => {
        /// The owner of `flow` (to `vip`), recording it when new and `mode` is `Record`.
        /// `syn`/`non_syn` describe a TCP segment (both false for UDP and ICMP lookups).
        #[inline(always)]
        pub fn $name(
            flow: &$flow,
            vip: &VipKey,
            syn: bool,
            non_syn: bool,
            mode: Mode,
        ) -> Result<Owner, Reason> {
            let client: [u32; 4] = $client(flow);
            if let Some(entry) = $table.get_ptr_mut(flow) {
                // SAFETY: a map value pointer from a successful lookup.
                let ConnEntry { engine_id, vs_id } = unsafe { *entry };
                if let Some(vs) = live_vs(vs_id, vip) {
                    let e = engine(engine_id).unwrap_or_default();
                    let state = e.state;
                    let takes_it = !syn || (state == ENGINE_ACTIVE && vs.rings(engine_id));
                    if (state == ENGINE_ACTIVE || state == ENGINE_DRAINING) && takes_it {
                        count(Reason::ConnHit);
                        return Ok(Owner {
                            vs_id,
                            engine_id,
                            engine: e,
                            new_flow: false,
                        });
                    }
                    count(if state == ENGINE_DRAINING && syn {
                        Reason::SynToDraining
                    } else if state == ENGINE_ACTIVE {
                        Reason::SynOffRing
                    } else {
                        Reason::ConnOwnerDown
                    });
                    let (id, e) = place(vs_id, vs, $hash(flow), &client, mode)?;
                    if mode == Mode::Record {
                        // SAFETY: as above.
                        unsafe { (*entry).engine_id = id };
                    }
                    return Ok(Owner {
                        vs_id,
                        engine_id: id,
                        engine: e,
                        new_flow: true,
                    });
                }
            }
            let vs_id = *VIPS
                .get_ptr(vip)
                .ok_or(Reason::PassNotVip)
                .map(|p| unsafe {
                    // SAFETY: a map value pointer from a successful lookup.
                    &*p
                })?;
            let vs = VS.get(vs_id).ok_or(Reason::PassNotVip)?;
            if vs.flags & VS_F_PRIMARY == 0 {
                return Err(Reason::PassNotPrimary);
            }
            if non_syn {
                count(Reason::TcpNonSynMiss);
            }
            if mode == Mode::Record && ask_about(vs, non_syn, flow.proto) {
                if ask_owner(&$query(flow, vs_id)) {
                    return Err(Reason::OwnerAsked);
                }
                count(Reason::OwnerQueryOverflow);
            }
            let (id, e) = place(vs_id, vs, $hash(flow), &client, mode)?;
            if mode == Mode::Record {
                let _ = $table.insert(
                    flow,
                    &ConnEntry {
                        engine_id: id,
                        vs_id,
                    },
                    0,
                );
                count(Reason::ConnNew);
            }
            Ok(Owner {
                vs_id,
                engine_id: id,
                engine: e,
                new_flow: true,
            })
        }
    };
}

owner_fn!(
    owner_v4,
    FlowV4,
    CONN_V4,
    flow_hash_v4,
    |f: &FlowV4| [f.src_be, 0, 0, 0],
    |f: &FlowV4, vs_id| OwnerQuery {
        vs_id,
        family: FAMILY_V4,
        proto: f.proto,
        _pad: 0,
        src_be: [f.src_be, 0, 0, 0],
        dst_be: [f.dst_be, 0, 0, 0],
        sport_be: f.sport_be,
        dport_be: f.dport_be,
    }
);
owner_fn!(
    owner_v6,
    FlowV6,
    CONN_V6,
    flow_hash_v6,
    |f: &FlowV6| f.src_be,
    |f: &FlowV6, vs_id| OwnerQuery {
        vs_id,
        family: FAMILY_V6,
        proto: f.proto,
        _pad: 0,
        src_be: f.src_be,
        dst_be: f.dst_be,
        sport_be: f.sport_be,
        dport_be: f.dport_be,
    }
);

/// Ring slots after a flow's own that are tried for a flow this host cannot take. Maglev
/// interleaves the engines' slots, so another engine is almost always a few slots on; the walk is
/// deterministic, so a client's retransmission meets the same choice.
pub const PLACE_AWAY_SLOTS: u32 = 64;

macro_rules! place_away_fn {
    ($name:ident, $flow:ty, $table:ident, $hash:ident) => {
        /// Another active engine than this host for `flow` of `vs_id`, whose first choice was this
        /// host while nothing here listens: the first of the [`PLACE_AWAY_SLOTS`] ring slots after
        /// the flow's own that names one, recorded in the connection table. If none does, the
        /// entry is removed so that the client's retransmission is placed afresh, and the packet
        /// is dropped.
        #[inline(always)]
        pub fn $name(flow: &$flow, vs_id: u32) -> Result<Owner, Reason> {
            let first = ring_slot($hash(flow));
            let mut attempt = 1;
            while attempt <= PLACE_AWAY_SLOTS {
                let slot = (first + attempt) % RING_SIZE;
                if let Ok((id, e)) = ring_engine_at(vs_id, slot) {
                    if e.mode != ENGINE_MODE_LOCAL {
                        let _ = $table.insert(
                            flow,
                            &ConnEntry {
                                engine_id: id,
                                vs_id,
                            },
                            0,
                        );
                        count(Reason::PlacedAwayNoListener);
                        return Ok(Owner {
                            vs_id,
                            engine_id: id,
                            engine: e,
                            new_flow: true,
                        });
                    }
                }
                attempt += 1;
            }
            let _ = $table.remove(flow);
            Err(Reason::DropNoListener)
        }
    };
}

place_away_fn!(place_away_v4, FlowV4, CONN_V4, flow_hash_v4);
place_away_fn!(place_away_v6, FlowV6, CONN_V6, flow_hash_v6);
