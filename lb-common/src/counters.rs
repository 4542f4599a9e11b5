//! Counters the data plane keeps in per-CPU arrays: traffic per virtual service and per engine,
//! and one counter per [`Reason`] (what happened to a packet, and why).

use core::mem::size_of;

/// Traffic of one virtual service or one engine (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 24);

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident = $num:literal => $label:literal, )*) => {
        /// What the data plane did with a packet and why. The numbers are stable: they index the
        /// `REASONS` map and name metrics, so a reason is never renumbered, only added.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[$doc])* $name = $num, )*
        }

        impl Reason {
            /// Every reason, in number order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The metric label of the reason.
            pub const fn label(self) -> &'static str {
                match self { $(Reason::$name => $label,)* }
            }
        }
    };
}

reasons! {
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp = 0 => "pass_not_ip",
    /// Passed: IP, but not to a VIP (address, port or protocol).
    PassNotVip = 1 => "pass_not_vip",
    /// Passed: a VIP this engine does not steer (it is a secondary; the primary already steered it here).
    PassNotPrimary = 2 => "pass_not_primary",
    /// Passed: headers cut short before the destination could be known; the stack decides.
    PassTruncated = 3 => "pass_truncated",
    /// Passed: IP header inconsistent (version, header length) before the destination was known.
    PassMalformed = 4 => "pass_malformed",
    /// Passed: an ICMP/ICMPv6 message to a VIP that is not about a VIP flow (echo, ...).
    PassIcmp = 5 => "pass_icmp",
    /// Passed: IPv6 with an extension header chain longer than the data plane walks.
    PassIpv6Ext = 6 => "pass_ipv6_ext",
    /// Passed to this host's stack: the flow's owner is this engine.
    Local = 7 => "local",
    /// Sent to another engine on the segment with `XDP_TX`.
    TxL2 = 8 => "tx_l2",
    /// Sent to another engine through the devmap (`XDP_REDIRECT`).
    RedirectL2 = 9 => "redirect_l2",
    /// Sent to another engine inside an IP-in-IP / IPv6-in-IPv6 tunnel.
    TxTunnel = 10 => "tx_tunnel",
    /// Connection table hit.
    ConnHit = 11 => "conn_hit",
    /// New flow: an engine was chosen and recorded in the connection table.
    ConnNew = 12 => "conn_new",
    /// Connection table named an engine that is down: the flow was re-hashed to an active one.
    ConnOwnerDown = 13 => "conn_owner_down",
    /// A TCP segment without SYN matched no connection (mid-flow after a table loss or failover).
    TcpNonSynMiss = 14 => "tcp_non_syn_miss",
    /// New flow placed by a live source-IP persistence entry.
    PersistHit = 15 => "persist_hit",
    /// Dropped: a VIP packet whose L4 header is cut short.
    DropTruncated = 16 => "drop_truncated",
    /// Dropped: an IP fragment to a VIP (fragments cannot be hashed to their flow; see README).
    DropFragment = 17 => "drop_fragment",
    /// Dropped: the virtual service has no active engine.
    DropNoEngine = 18 => "drop_no_engine",
    /// Dropped: tunnel mode, but the engine or this host has no address of the packet's family.
    DropTunnelNoAddr = 19 => "drop_tunnel_no_addr",
    /// Dropped: `bpf_xdp_adjust_head` refused to grow the packet for encapsulation.
    DropAdjustHead = 20 => "drop_adjust_head",
    /// An ICMP "fragmentation needed" / ICMPv6 "packet too big" about a VIP flow, sent to the flow's owner.
    IcmpSteered = 21 => "icmp_steered",
    /// Dropped: an ICMP error about a VIP flow whose quoted headers are cut short or inconsistent.
    DropIcmpMalformed = 22 => "drop_icmp_malformed",
    /// Dropped: the devmap had no usable interface for an engine reached through another interface.
    DropRedirect = 23 => "drop_redirect",
    /// A SYN matched a flow owned by a draining engine: a new connection reusing the ports, placed
    /// again (draining engines take no new connections).
    SynToDraining = 24 => "syn_to_draining",
    /// A new flow the ring gave to this host while nothing here listens on the VIP (the daemon is
    /// restarting, its proxy is gone): placed on another engine of the ring instead.
    PlacedAwayNoListener = 25 => "placed_away_no_listener",
    /// Dropped: a SYN or new UDP flow for this host while nothing here listens on the VIP, and no
    /// other engine could take it; the client retransmits (the daemon may be back by then) instead
    /// of being reset by the stack.
    DropNoListener = 26 => "drop_no_listener",
    /// A packet too big for the tunnel to its owner once encapsulated: an ICMP "fragmentation
    /// needed" / ICMPv6 "packet too big" with the MTU to use went back to the sender.
    IcmpTooBigSent = 27 => "icmp_too_big_sent",
    /// Dropped: too big for the tunnel and no reply is due: an IPv4 packet without DF (fragments
    /// to a VIP cannot be steered, so it is not fragmented), or an ICMP error being steered.
    DropTooBigNoDf = 28 => "drop_too_big_no_df",
    /// Dropped: too big for the tunnel, and this CPU's ICMP too-big replies are over their rate.
    DropTooBigRateLimited = 29 => "drop_too_big_rate_limited",
    /// A peer's data-plane echo probe, answered here (`XDP_TX`): this host's data plane is alive,
    /// whatever its daemon is doing.
    PeerEchoAnswered = 30 => "peer_echo_answered",
    /// Dropped: a data-plane echo probe over this CPU's rate.
    DropPeerEchoRateLimited = 31 => "drop_peer_echo_rate_limited",
    /// Dropped, handed to the daemon: a packet of a flow this primary does not know (a TCP segment
    /// without SYN, or a UDP datagram right after a promotion). The daemon asks the other engines
    /// who owns it and records the answer; the client's next packet goes there.
    OwnerAsked = 32 => "owner_asked",
    /// An unknown flow placed by the ring without asking: this CPU's owner queries are over their
    /// rate, or the queue to the daemon is full.
    OwnerQueryOverflow = 33 => "owner_query_overflow",
    /// A SYN matched a flow whose engine no longer takes new connections of the service (its
    /// weight is 0, it left the service): a new connection reusing the ports, placed again. (A
    /// retransmitted SYN whose engine still takes new connections keeps its engine.)
    SynOffRing = 34 => "syn_off_ring",
}

/// Size of the `REASONS` map.
pub const REASON_COUNT: u32 = 35;
const _: () = assert!(Reason::ALL.len() == REASON_COUNT as usize);

/// Transmit failures after the XDP verdict, counted from the kernel's `xdp` tracepoints (the index of
/// the `TX_ERRORS` map; stable numbers, like [`Reason`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxError {
    /// `xdp_exception` with `XDP_TX`: the driver could not transmit the frame.
    Tx = 0,
    /// `xdp_exception` with `XDP_REDIRECT`, or `xdp_redirect_err`: the redirect failed.
    Redirect = 1,
    /// `xdp_exception` with another verdict (an aborted program, an unknown verdict).
    Other = 2,
    /// `xdp_bulk_tx` drops on this engine's interface (veth: frame bigger than the peer takes).
    BulkDrop = 3,
}

impl TxError {
    pub const ALL: [TxError; 4] = [
        TxError::Tx,
        TxError::Redirect,
        TxError::Other,
        TxError::BulkDrop,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            TxError::Tx => "tx",
            TxError::Redirect => "redirect",
            TxError::Other => "other",
            TxError::BulkDrop => "bulk_tx_drop",
        }
    }
}

/// Size of the `TX_ERRORS` map.
pub const TX_ERROR_COUNT: u32 = 4;
const _: () = assert!(TxError::ALL.len() == TX_ERROR_COUNT as usize);

/// Which transmit failures are this engine's (the one entry of `TX_ERROR_FILTER`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxErrorFilter {
    /// The kernel id of this engine's steering program.
    pub prog_id: u32,
    /// The interface it is attached to.
    pub ifindex: u32,
}
const _: () = assert!(size_of::<TxErrorFilter>() == 8);
