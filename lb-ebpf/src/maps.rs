//! Every map of the data plane, in one place. Sizes here are defaults: the daemon sets the real
//! ones at load time. The connection and persistence tables are pinned (by name, under the daemon's
//! pin directory) so a daemon restart or upgrade keeps them, with `STATE_LAYOUT` saying which layout
//! of their keys and values they hold.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    ConnEntry, DEFAULT_CONN_ENTRIES, DEFAULT_MAX_VS, DEFAULT_PERSIST_ENTRIES, Engine, FlowV4,
    FlowV6, Globals, MAX_ENGINES, OWNER_QUERY_RING_BYTES, PersistEntry, PersistKey, REASON_COUNT,
    RING_SIZE, TX_ERROR_COUNT, TrafficCounters, TxErrorFilter, VIP_PORT_WORDS, VipKey, VsEntry,
};

/// LRU lists per CPU, hash table shared: inserts never contend on a global LRU lock (the point of
/// Katran's per-CPU LRU maps), yet one table holds each flow once, so a flow whose packets move to
/// another CPU still hits and userspace reads one owner per flow.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// (VIP address, port, protocol) → virtual service id.
#[map]
pub static VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VS, 0);

/// Virtual service id → its VIP and flags.
#[map]
pub static VS: Array<VsEntry> = Array::with_max_entries(DEFAULT_MAX_VS, 0);

/// One bit per (protocol, port) that some VIP uses (see `lb_common::vip_port_bit`).
#[map]
pub static VIP_PORTS: Array<u64> = Array::with_max_entries(VIP_PORT_WORDS, 0);

/// VIP addresses alone (key with port 0 and protocol 0) → number of virtual services on them.
/// Consulted only for packets whose port cannot be read: fragments and truncated L4 headers.
#[map]
pub static VIP_ADDRS: HashMap<VipKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VS, 0);

/// Maglev rings of all virtual services back to back: slot `s` of service `v` is `v * RING_SIZE + s`.
#[map]
pub static RING: Array<u32> = Array::with_max_entries(DEFAULT_MAX_VS * RING_SIZE, 0);

/// Engine id → how to reach it.
#[map]
pub static ENGINES: Array<Engine> = Array::with_max_entries(MAX_ENGINES, 0);

/// Engine id → egress interface, for engines reached through another interface (`XDP_REDIRECT`).
#[map]
pub static DEVMAP: DevMap = DevMap::with_max_entries(MAX_ENGINES, 0);

/// IPv4 connection table: flow → owning engine.
#[map]
pub static CONN_V4: LruHashMap<FlowV4, ConnEntry> =
    LruHashMap::pinned(DEFAULT_CONN_ENTRIES, BPF_F_NO_COMMON_LRU);

/// IPv6 connection table: flow → owning engine.
#[map]
pub static CONN_V6: LruHashMap<FlowV6, ConnEntry> =
    LruHashMap::pinned(DEFAULT_CONN_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Source-IP persistence: (client, virtual service) → engine, with the time it was last used.
#[map]
pub static PERSIST: LruHashMap<PersistKey, PersistEntry> =
    LruHashMap::pinned(DEFAULT_PERSIST_ENTRIES, BPF_F_NO_COMMON_LRU);

/// The layout version of the pinned state tables (`lb_common::STATE_LAYOUT_VERSION`), written by the
/// daemon that created them and checked by every daemon that adopts them.
#[map]
pub static STATE_LAYOUT: Array<u32> = Array::pinned(1, 0);

/// Rate limit of ICMP too-big replies (per CPU): the theoretical arrival time of the next one.
#[map]
pub static TOO_BIG_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Rate limit of data-plane echo answers (per CPU): the theoretical arrival time of the next one.
#[map]
pub static PEER_ECHO_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Flows of unknown owner handed to the daemon (`lb_common::OwnerQuery` records).
#[map]
pub static OWNER_QUERIES: RingBuf = RingBuf::with_byte_size(OWNER_QUERY_RING_BYTES, 0);

/// Rate limit of owner queries (per CPU): the theoretical arrival time of the next one.
#[map]
pub static OWNER_QUERY_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Data-plane wide settings (one entry).
#[map]
pub static GLOBALS: Array<Globals> = Array::with_max_entries(1, 0);

/// Traffic per virtual service (per CPU).
#[map]
pub static VS_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_VS, 0);

/// Traffic per engine the flows were sent to (per CPU).
#[map]
pub static ENGINE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_ENGINES, 0);

/// Transmit failures after the verdict, one counter per `lb_common::TxError` (per CPU).
#[map]
pub static TX_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TX_ERROR_COUNT, 0);

/// When each kind of transmit failure was last logged (`bpf_ktime_get_ns`, per CPU): the
/// tracepoint programs log a kind at most once a second per CPU.
#[map]
pub static TX_ERRORS_LOGGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(TX_ERROR_COUNT, 0);

/// This engine's program id and interface: the transmit failures `TX_ERRORS` counts.
#[map]
pub static TX_ERROR_FILTER: Array<TxErrorFilter> = Array::with_max_entries(1, 0);

/// One counter per `lb_common::Reason` (per CPU).
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
