//! Keys and values of the data plane's maps, with the limits that size them.

use core::mem::size_of;

/// Slots in one virtual service's Maglev ring (prime, as Maglev requires).
pub const RING_SIZE: u32 = 65537;
/// Engine ids are indices into the engine table: `0..MAX_ENGINES`.
pub const MAX_ENGINES: u32 = 256;
/// Default number of virtual services (ring storage is `max_vs * RING_SIZE` slots).
pub const DEFAULT_MAX_VS: u32 = 64;
/// Default connection-table capacity (per address family).
pub const DEFAULT_CONN_ENTRIES: u32 = 1 << 20;
/// Default source-IP persistence table capacity.
pub const DEFAULT_PERSIST_ENTRIES: u32 = 1 << 18;
/// Layout version of the pinned state tables (`CONN_V4`, `CONN_V6`, `PERSIST`): the meaning of their
/// keys and values. Bump it with any change to [`FlowV4`], [`FlowV6`], [`ConnEntry`], [`PersistKey`]
/// or [`PersistEntry`] beyond what their sizes show; a daemon refuses pinned tables of another
/// version instead of misreading them.
pub const STATE_LAYOUT_VERSION: u32 = 1;
/// A ring slot that names no engine (the virtual service has no active engine).
pub const ENGINE_NONE: u32 = u32::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMPV6: u8 = 58;

/// Key of the VIP table: one virtual service is one (address, port, protocol).
/// IPv4 addresses use `addr_be[0]`; the other words are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// This engine steers the virtual service (it is the primary). Without it the VIP's packets are
/// passed to the local stack: they were already steered here by the primary.
pub const VS_F_PRIMARY: u32 = 1 << 0;
/// New flows consult and fill the source-IP persistence table.
pub const VS_F_PERSIST: u32 = 1 << 1;
/// The virtual service drains (`virtual_services[].draining`): its listeners are closed on purpose
/// and new connections are to be refused at once (the stack resets them), not held back for a
/// listener to come back as while a daemon restarts.
pub const VS_F_REFUSE_NEW: u32 = 1 << 2;
/// A TCP segment without SYN of a flow the connection table does not know is handed to the daemon
/// (the `OWNER_QUERIES` ring buffer) and dropped, instead of being placed by the ring: the daemon
/// asks the other engines who owns it. Set where this engine steers a service with peers.
pub const VS_F_ASK_OWNER: u32 = 1 << 3;
/// The same for UDP datagrams of unknown flows: set only for a while after a promotion, when the
/// surviving engines' sessions are not yet in this engine's table.
pub const VS_F_ASK_OWNER_UDP: u32 = 1 << 4;

/// Value of the VS table (an array indexed by virtual service id). The VIP table maps a
/// (VIP, port, protocol) to the id; a connection-table hit finds the service here directly and
/// checks `vip` against the packet, so a stale entry of a removed or re-used id is never followed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsEntry {
    pub vip: VipKey,
    /// `VS_F_*`.
    pub flags: u32,
    /// Lifetime of a persistence entry after the last new flow that used it.
    pub persist_timeout_s: u32,
    /// The engines the ring names (weight > 0, active), one bit per engine id: a SYN follows its
    /// connection-table entry only to one of them (see [`VsEntry::rings`]).
    pub ring_engines: [u32; (MAX_ENGINES / 32) as usize],
}
const _: () = assert!(size_of::<VsEntry>() == 60);

impl VsEntry {
    /// Whether the ring names engine `id`.
    #[inline(always)]
    pub const fn rings(&self, id: u32) -> bool {
        id < MAX_ENGINES && self.ring_engines[(id >> 5) as usize] & (1 << (id & 31)) != 0
    }

    /// Marks engine `id` (below [`MAX_ENGINES`]) as named by the ring.
    pub fn set_ring_engine(&mut self, id: u32) {
        if id < MAX_ENGINES {
            self.ring_engines[(id >> 5) as usize] |= 1 << (id & 31);
        }
    }
}

/// Words of the VIP port bitmap: one bit per (protocol, port), TCP ports in words
/// `0..1024`, UDP ports in `1024..2048`. Packets to ports no VIP uses pass after one array read.
pub const VIP_PORT_WORDS: u32 = 2048;

/// The bitmap word and bit of `(proto, port)`; `None` for protocols VIPs cannot use.
#[inline(always)]
pub const fn vip_port_bit(proto: u8, port: u16) -> Option<(u32, u64)> {
    let base = match proto {
        PROTO_TCP => 0,
        PROTO_UDP => 1024,
        _ => return None,
    };
    Some((base + (port as u32 >> 6), 1u64 << (port & 63)))
}

/// Connection-table key for IPv4 flows (client → VIP direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowV4 {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowV4>() == 16);

impl FlowV4 {
    #[inline(always)]
    pub const fn new(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        FlowV4 {
            src_be,
            dst_be,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Connection-table key for IPv6 flows (client → VIP direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowV6 {
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowV6>() == 40);

impl FlowV6 {
    #[inline(always)]
    pub const fn new(
        src_be: [u32; 4],
        dst_be: [u32; 4],
        sport_be: u16,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        FlowV6 {
            src_be,
            dst_be,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Connection-table value: the engine that owns the flow, and the virtual service it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub engine_id: u32,
    pub vs_id: u32,
}
const _: () = assert!(size_of::<ConnEntry>() == 8);

/// Source-IP persistence key: (client address, virtual service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PersistKey {
    pub client_be: [u32; 4],
    pub vs_id: u32,
}
const _: () = assert!(size_of::<PersistKey>() == 20);

/// Source-IP persistence value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistEntry {
    pub engine_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when a new flow last used the entry.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<PersistEntry>() == 16);

/// Engine states. Only active engines are in rings; the data plane also checks the state on every
/// connection-table and persistence hit.
pub const ENGINE_UNUSED: u8 = 0;
/// Gets new flows and keeps its own.
pub const ENGINE_ACTIVE: u8 = 1;
/// Gets no new flows, keeps its existing ones.
pub const ENGINE_DRAINING: u8 = 2;
/// Gets nothing: its flows are re-hashed to active engines.
pub const ENGINE_DOWN: u8 = 3;

/// This host: packets are passed to the local stack.
pub const ENGINE_MODE_LOCAL: u8 = 0;
/// Same L2 segment: rewrite MACs, `XDP_TX` (or `XDP_REDIRECT` through the devmap).
pub const ENGINE_MODE_L2: u8 = 1;
/// Routed: IP-in-IP (IPv4) / IPv6-in-IPv6 to the engine's address, sent to `mac` (the next hop).
pub const ENGINE_MODE_TUNNEL: u8 = 2;

/// Value of the engine table (indexed by engine id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Engine {
    /// Destination MAC: the engine's own (L2 mode) or the next hop's (tunnel mode).
    pub dst_mac: [u8; 6],
    /// Source MAC of frames sent towards the engine (the egress interface's).
    pub src_mac: [u8; 6],
    /// `ENGINE_*` state.
    pub state: u8,
    /// `ENGINE_MODE_*`.
    pub mode: u8,
    /// Tunnel mode: the largest IP packet the path to the engine carries (encapsulation included);
    /// a packet that would exceed it is answered with ICMP too-big. 0: not checked.
    pub mtu: u16,
    /// Egress interface; 0 means the interface the packet arrived on (`XDP_TX`). Any other value
    /// redirects through the devmap entry at this engine's id.
    pub ifindex: u32,
    /// Tunnel endpoint for IPv4 traffic (0: none).
    pub addr_v4_be: u32,
    /// Tunnel endpoint for IPv6 traffic (all zero: none).
    pub addr_v6_be: [u32; 4],
}
const _: () = assert!(size_of::<Engine>() == 40);

/// Data-plane wide settings (a one-entry array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Globals {
    /// Outer source address of IPv4 tunnel packets.
    pub tunnel_src_v4_be: u32,
    /// UDP port of the peer probes (network order; 0: none): data-plane echo probes to it are
    /// answered by the XDP program itself.
    pub peer_port_be: u16,
    pub _pad: u16,
    /// Outer source address of IPv6 tunnel packets.
    pub tunnel_src_v6_be: [u32; 4],
    /// This engine's address on the segment (`engines[].address_v4`; 0: none): echo probes are
    /// answered only when sent to it, not when a switch floods one meant for another engine.
    pub peer_addr_v4_be: u32,
}
const _: () = assert!(size_of::<Globals>() == 28);

/// A flow the data plane asks the daemon about (a record of the `OWNER_QUERIES` ring buffer).
/// IPv4 addresses use word 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerQuery {
    pub vs_id: u32,
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(size_of::<OwnerQuery>() == 44);

/// Bytes of the `OWNER_QUERIES` ring buffer (a power of two, a multiple of the page size): about
/// 5000 queries waiting for the daemon at most; beyond that, unknown flows are placed by the ring.
pub const OWNER_QUERY_RING_BYTES: u32 = 1 << 18;

/// Length of a data-plane echo probe's UDP payload (see the daemon's `peers` module).
pub const PEER_ECHO_LEN: usize = 44;
/// First bytes of every peer message.
pub const PEER_MAGIC: [u8; 4] = *b"LBP2";
/// Message kinds the data plane knows: an echo request, which it turns into an echo reply.
pub const PEER_KIND_ECHO: u8 = 2;
pub const PEER_KIND_ECHO_REPLY: u8 = 3;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, has no padding the asserts above do not account for,
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VsEntry {}
    unsafe impl aya::Pod for super::FlowV4 {}
    unsafe impl aya::Pod for super::FlowV6 {}
    unsafe impl aya::Pod for super::ConnEntry {}
    unsafe impl aya::Pod for super::PersistKey {}
    unsafe impl aya::Pod for super::PersistEntry {}
    unsafe impl aya::Pod for super::Engine {}
    unsafe impl aya::Pod for super::Globals {}
    unsafe impl aya::Pod for super::OwnerQuery {}
    unsafe impl aya::Pod for crate::TrafficCounters {}
    unsafe impl aya::Pod for crate::TxErrorFilter {}
}
