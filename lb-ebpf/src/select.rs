//! Choosing the engine for a flow: the connection table first (a recorded flow never moves unless
//! its engine is down), then source-IP persistence, then the virtual service's Maglev ring.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    ConnEntry, ENGINE_ACTIVE, ENGINE_DOWN, ENGINE_NONE, Engine, FlowV4, FlowV6, PersistEntry,
    PersistKey, RING_SIZE, Reason, VS_F_PERSIST, VsMeta,
    hash::{client_hash, flow_hash_v4, flow_hash_v6, ring_slot},
};

use crate::{
    counters::count,
    maps::{CONN_V4, CONN_V6, ENGINES, PERSIST, RING},
};

/// The engine a packet goes to.
pub struct Owner {
    pub engine_id: u32,
    pub engine: Engine,
    /// The flow was placed now (not found in the connection table).
    pub new_flow: bool,
    /// Flow hash, for tunnel entropy.
    pub hash: u32,
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

/// Ring slot → engine. Userspace keeps only active engines in rings; a slot naming a down engine
/// (a ring update in flight) is treated as empty.
#[inline(always)]
fn ring_engine(vs_id: u32, hash: u32) -> Result<(u32, Engine), Reason> {
    let id = *RING
        .get(vs_id * RING_SIZE + ring_slot(hash))
        .ok_or(Reason::DropNoEngine)?;
    if id == ENGINE_NONE {
        return Err(Reason::DropNoEngine);
    }
    match engine(id) {
        Some(e) if e.state != ENGINE_DOWN => Ok((id, e)),
        _ => Err(Reason::DropNoEngine),
    }
}

/// A new flow's engine: persistence (for persistent services), else the ring.
#[inline(always)]
fn place(
    vs: &VsMeta,
    flow_hash: u32,
    client_be: &[u32; 4],
    mode: Mode,
) -> Result<(u32, Engine), Reason> {
    if vs.flags & VS_F_PERSIST == 0 {
        return ring_engine(vs.vs_id, flow_hash);
    }
    let key = PersistKey {
        client_be: *client_be,
        vs_id: vs.vs_id,
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
    let (id, e) = ring_engine(vs.vs_id, client_hash(client_be))?;
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

macro_rules! owner_fn {
    ($name:ident, $flow:ty, $table:ident, $hash:ident) => {
        /// The owner of `flow`, recording it when new (and `mode` is `Record`).
        #[inline(always)]
        pub fn $name(
            flow: &$flow,
            vs: &VsMeta,
            tcp_non_syn: bool,
            mode: Mode,
        ) -> Result<Owner, Reason> {
            let hash = $hash(flow);
            if let Some(entry) = $table.get_ptr_mut(flow) {
                // SAFETY: a map value pointer from a successful lookup.
                let id = unsafe { (*entry).engine_id };
                if let Some(e) = engine(id) {
                    if e.state != ENGINE_DOWN {
                        count(Reason::ConnHit);
                        return Ok(Owner {
                            engine_id: id,
                            engine: e,
                            new_flow: false,
                            hash,
                        });
                    }
                }
                count(Reason::ConnOwnerDown);
                let (id, e) = place(vs, hash, &flow.client(), mode)?;
                if mode == Mode::Record {
                    // SAFETY: as above.
                    unsafe { (*entry).engine_id = id };
                }
                return Ok(Owner {
                    engine_id: id,
                    engine: e,
                    new_flow: true,
                    hash,
                });
            }
            if tcp_non_syn {
                count(Reason::TcpNonSynMiss);
            }
            let (id, e) = place(vs, hash, &flow.client(), mode)?;
            if mode == Mode::Record {
                let _ = $table.insert(flow, &ConnEntry { engine_id: id }, 0);
                count(Reason::ConnNew);
            }
            Ok(Owner {
                engine_id: id,
                engine: e,
                new_flow: true,
                hash,
            })
        }
    };
}

owner_fn!(owner_v4, FlowV4, CONN_V4, flow_hash_v4);
owner_fn!(owner_v6, FlowV6, CONN_V6, flow_hash_v6);

/// The client side of a flow key.
trait Client {
    fn client(&self) -> [u32; 4];
}
impl Client for FlowV4 {
    #[inline(always)]
    fn client(&self) -> [u32; 4] {
        [self.src_be, 0, 0, 0]
    }
}
impl Client for FlowV6 {
    #[inline(always)]
    fn client(&self) -> [u32; 4] {
        self.src_be
    }
}
