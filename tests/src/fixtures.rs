//! Katran-style fixtures for the XDP program: a packet in, the verdict and the exact packet out, and
//! the reason counters that must move — run through `BPF_PROG_TEST_RUN`, no interface needed.
//!
//! - [`Packet`]: frames built with etherparse (Ethernet, one VLAN tag, IPv4/IPv6, TCP/UDP/ICMP, with
//!   correct checksums), and the expected outputs built independently of the program
//!   ([`rewrite_macs`], [`ipip`], [`ip6ip6`]).
//! - [`Fixture`]: `{description, setup, input, expected_action, expected_output, expected_reasons}`.
//! - [`Testbed`]: a freshly loaded data plane with its own pin directory (removed on drop), small
//!   tables, and [`STANDARD_CONFIG`] applied through `Tables::plan` / `Changes::between` — the
//!   daemon's own path. [`Testbed::check`] runs a fixture; [`Testbed::reconfigure`] applies a changed
//!   configuration the way a reload does.
//! - Ring prediction: [`Testbed::ring_owner`] and [`Testbed::ports_to`] pick client ports whose flows
//!   the Maglev ring gives to a chosen engine; [`Testbed::expect_new_flow`] is the oracle for a new
//!   flow's verdict and output.
//! - Peers: [`with_peers`] adds a `[peers]` section; [`peer_message`] / [`peer_echo_reply`] build a
//!   data-plane echo probe and its expected answer; [`Testbed::owner_queries`] reads the owner-query
//!   ring buffer and [`Testbed::set_rate_state`] sets a per-CPU rate limit's state.
//!
//! The benchmark reuses [`fx_non_vip`], [`fx_new_flow`] and [`fx_conn_hit`].
//!
//! Everything here needs root (loading BPF programs, bpffs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use etherparse::{
    IpDscp, IpEcn, IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4Options,
    Ipv6Extensions, Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header, PacketBuilder,
    PacketBuilderStep, TcpHeader, VlanId,
};
use lb_common::{
    ENGINE_MODE_L2, ENGINE_MODE_LOCAL, FlowV4, FlowV6, OwnerQuery, PEER_ECHO_LEN,
    PEER_KIND_ECHO_REPLY, PEER_MAGIC, PROTO_TCP, PROTO_UDP, REASON_COUNT, Reason, VS_F_PERSIST,
    VS_F_PRIMARY, VipKey,
    addr::{ip_be, v4_be, v6_be},
    hash::{client_hash, flow_hash_v4, flow_hash_v6, ring_slot},
};
use lb_daemon::{
    config::Config,
    dataplane::Dataplane,
    tables::{Changes, Link, Links, PlanError, Tables},
};

/// XDP verdicts (`enum xdp_action`).
pub mod xdp {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;

    /// The verdict's name, for messages.
    pub fn name(action: u32) -> &'static str {
        match action {
            ABORTED => "XDP_ABORTED",
            DROP => "XDP_DROP",
            PASS => "XDP_PASS",
            TX => "XDP_TX",
            REDIRECT => "XDP_REDIRECT",
            _ => "XDP_?",
        }
    }
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Source MAC of incoming frames (the router in front of the primary).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// MAC of the daemon's interface (`eth0` in [`STANDARD_CONFIG`]; a fake link).
pub const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MTU of the fake links: the tunnel engine's path MTU (an encapsulated packet may be this big).
pub const LINK_MTU: u32 = 1500;
/// MAC the fake links give `lo` (the egress of engine 5).
pub const LO_LINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

/// Engine ids of [`STANDARD_CONFIG`].
pub const E_LOCAL: u32 = 1;
pub const E_L2_A: u32 = 2;
pub const E_L2_B: u32 = 3;
pub const E_TUNNEL: u32 = 4;
pub const E_REDIRECT: u32 = 5;

/// Virtual service ids of [`STANDARD_CONFIG`].
pub const VS_WEB: u32 = 0;
pub const VS_WEB6: u32 = 1;
pub const VS_DNS: u32 = 2;
pub const VS_STICKY: u32 = 3;
pub const VS_SECONDARY: u32 = 4;
pub const VS_REDIRECT: u32 = 5;

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
pub const VIP4_STICKY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 20);
pub const VIP4_SECONDARY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 30);
pub const VIP4_REDIRECT: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 50);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
/// A router that sends ICMP errors.
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
pub const TUNNEL_SRC4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const TUNNEL_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const ENGINE4_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 4);
pub const ENGINE4_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 4);

/// Destination MAC of an engine of [`STANDARD_CONFIG`] (engine 4: its next hop).
pub const fn engine_mac(id: u32) -> [u8; 6] {
    #[allow(clippy::cast_possible_truncation)]
    [0x02, 0, 0, 0, 0, id as u8]
}

/// UDP port of the peer probes in [`with_peers`] (the daemon's default `[peers] port`).
pub const PEER_PORT: u16 = 7401;
/// This host's own address (engine 1's `address_v4`), which peers probe (it is also the IPv4
/// tunnel source).
pub const HOST4: Ipv4Addr = TUNNEL_SRC4;
/// A peer engine on the segment that probes this host.
pub const PEER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Source port of [`PEER4`]'s probes: not [`PEER_PORT`], so that a reply's swapped ports show.
pub const PEER_SPORT: u16 = 40_401;

/// `config` with a `[peers]` section (probes on [`PEER_PORT`]): the data plane answers echo probes,
/// and the services this engine is primary of with more than one engine ask the daemon about
/// unknown flows (`VS_F_ASK_OWNER`).
pub fn with_peers(config: &str) -> String {
    format!("{config}\n[peers]\nkey = \"00112233445566778899aabbccddeeff\"\nport = {PEER_PORT}\n")
}

/// The test data plane's configuration: this host is engine 1 (local); engines 2 and 3 are on the
/// segment; engine 4 is reached through IP-in-IP / IPv6-in-IPv6; engine 5 is on the segment behind
/// another interface (`lo`, so `XDP_REDIRECT` through the devmap).
///
/// Lines that tests change carry a `# marker` comment; see [`edit`] and [`engine_state`].
pub const STANDARD_CONFIG: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1
max_virtual_services = 8
conn_table_size = 4096
persist_table_size = 4096
tunnel_source_v4 = "192.0.2.1" # tunnel_source_v4
tunnel_source_v6 = "2001:db8::1" # tunnel_source_v6

[[engines]]
id = 1
address_v4 = "192.0.2.1"

[[engines]]
id = 2
mac = "02:00:00:00:00:02"
state = "active" # engine 2

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
state = "active" # engine 3

[[engines]]
id = 4
mac = "02:00:00:00:00:04"
mode = "tunnel"
state = "active" # engine 4
address_v4 = "192.0.2.4" # engine 4 address_v4
address_v6 = "2001:db8::4" # engine 4 address_v6

[[engines]]
id = 5
mac = "02:00:00:00:00:05"
state = "active" # engine 5
interface = "lo"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 }, { id = 4 } ] # web engines

[[virtual_services]]
id = 1
name = "web6"
vip = "fd00::10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 }, { id = 4 } ] # web6 engines

[[virtual_services]]
id = 2
name = "dns"
vip = "10.100.0.10"
port = 53
protocol = "udp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 }, { id = 4 } ] # dns engines

[[virtual_services]]
id = 3
name = "sticky"
vip = "10.100.0.20"
port = 443
protocol = "tcp"
primary = 1
persistence_timeout_s = 300 # sticky timeout
engines = [ { id = 2 }, { id = 3 } ] # sticky engines

[[virtual_services]]
id = 4
name = "secondary"
vip = "10.100.0.30"
port = 80
protocol = "tcp"
primary = 2
engines = [ { id = 1 }, { id = 2 } ]

[[virtual_services]]
id = 5
name = "redirect"
vip = "10.100.0.50"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 5 } ]
"#;

/// `text` with the one occurrence of `from` replaced by `to` (panics unless `from` occurs exactly once,
/// so a configuration edit can never silently do nothing).
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} must occur exactly once in the configuration"
    );
    text.replacen(from, to, 1)
}

/// `text` with engine `id` (2..=5) put in `state` ("active", "draining", "down").
pub fn engine_state(text: &str, id: u32, state: &str) -> String {
    edit(
        text,
        &format!("state = \"active\" # engine {id}"),
        &format!("state = \"{state}\" # engine {id}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Packets

/// The transport part of a [`Packet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (in IPv4) or ICMPv6 (in IPv6): type, code, header bytes 5..8; the payload follows.
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
    },
}

/// A frame to build: Ethernet, optionally one 802.1Q tag, IPv4 or IPv6, TCP/UDP/ICMP, payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TOS byte / IPv6 traffic class.
    pub tos: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units. IPv6 gets a fragment header when this or `more_fragments` is set.
    pub fragment_offset: u16,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Packet {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Packet {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "{src} and {dst} are of different families"
        );
        Packet {
            src_mac: ROUTER_MAC,
            dst_mac: OUR_MAC,
            vlan: None,
            src,
            dst,
            tos: 0,
            ttl: 64,
            dont_fragment: false,
            more_fragments: false,
            fragment_offset: 0,
            ip_options: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP segment from `src` to `dst` with `flags` ([`tcp_flags`]).
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Packet {
        Packet::new(
            src.ip(),
            dst.ip(),
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                flags,
            },
        )
    }

    /// A TCP SYN from `src` to `dst`.
    pub fn syn(src: SocketAddr, dst: SocketAddr) -> Packet {
        Packet::tcp(src, dst, tcp_flags::SYN)
    }

    /// A TCP ACK (mid-connection segment) from `src` to `dst`.
    pub fn ack(src: SocketAddr, dst: SocketAddr) -> Packet {
        Packet::tcp(src, dst, tcp_flags::ACK).with_payload(b"GET / HTTP/1.1\r\n\r\n")
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Packet {
        Packet::new(
            src.ip(),
            dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
            },
        )
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) message.
    pub fn icmp(
        src: IpAddr,
        dst: IpAddr,
        kind: u8,
        code: u8,
        rest: [u8; 4],
        payload: &[u8],
    ) -> Packet {
        Packet::new(src, dst, L4::Icmp { kind, code, rest }).with_payload(payload)
    }

    #[must_use]
    pub fn with_payload(mut self, payload: &[u8]) -> Packet {
        self.payload = payload.to_vec();
        self
    }

    #[must_use]
    pub fn with_vlan(mut self, id: u16) -> Packet {
        self.vlan = Some(id);
        self
    }

    #[must_use]
    pub fn with_tos(mut self, tos: u8) -> Packet {
        self.tos = tos;
        self
    }

    #[must_use]
    pub fn with_df(mut self) -> Packet {
        self.dont_fragment = true;
        self
    }

    #[must_use]
    pub fn with_fragment(mut self, more_fragments: bool, offset: u16) -> Packet {
        self.more_fragments = more_fragments;
        self.fragment_offset = offset;
        self
    }

    #[must_use]
    pub fn with_ip_options(mut self, options: &[u8]) -> Packet {
        self.ip_options = options.to_vec();
        self
    }

    #[must_use]
    pub fn with_ttl(mut self, ttl: u8) -> Packet {
        self.ttl = ttl;
        self
    }

    /// The client side (source address and port).
    pub fn client(&self) -> SocketAddr {
        let sport = match self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
            L4::Icmp { .. } => 0,
        };
        SocketAddr::new(self.src, sport)
    }

    /// The connection-table key of this packet's flow (TCP and UDP only).
    pub fn flow(&self) -> Flow {
        let (sport, dport, proto) = match self.l4 {
            L4::Tcp { sport, dport, .. } => (sport, dport, PROTO_TCP),
            L4::Udp { sport, dport } => (sport, dport, PROTO_UDP),
            L4::Icmp { .. } => panic!("an ICMP packet has no flow key"),
        };
        Flow::new(
            SocketAddr::new(self.src, sport),
            SocketAddr::new(self.dst, dport),
            proto,
        )
    }

    fn ip_headers(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(0, self.ttl, IpNumber::TCP, s.octets(), d.octets())
                    .expect("empty payload fits");
                h.dscp = IpDscp::try_new(self.tos >> 2).expect("6 bits");
                h.ecn = IpEcn::try_new(self.tos & 3).expect("2 bits");
                h.identification = 0x1234;
                h.dont_fragment = self.dont_fragment;
                h.more_fragments = self.more_fragments;
                h.fragment_offset = IpFragOffset::try_new(self.fragment_offset).expect("13 bits");
                h.options = Ipv4Options::try_from(self.ip_options.as_slice())
                    .expect("IPv4 options: a multiple of 4 bytes, at most 40");
                IpHeaders::Ipv4(h, Ipv4Extensions::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: 0,
                    next_header: IpNumber::TCP,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                let mut exts = Ipv6Extensions::default();
                if self.more_fragments || self.fragment_offset != 0 {
                    let offset = IpFragOffset::try_new(self.fragment_offset).expect("13 bits");
                    exts.fragment = Some(Ipv6FragmentHeader::new(
                        IpNumber::TCP,
                        offset,
                        self.more_fragments,
                        0x1234,
                    ));
                }
                IpHeaders::Ipv6(h, exts)
            }
            _ => unreachable!("checked in Packet::new"),
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let step = match self.vlan {
            Some(id) => eth
                .single_vlan(VlanId::try_new(id).expect("12-bit VLAN id"))
                .ip(self.ip_headers()),
            None => eth.ip(self.ip_headers()),
        };
        self.finish(step)
    }

    /// The IP packet alone (no Ethernet header), e.g. to quote in an ICMP error.
    pub fn build_ip(&self) -> Vec<u8> {
        self.finish(PacketBuilder::ip(self.ip_headers()))
    }

    fn finish(&self, step: PacketBuilderStep<IpHeaders>) -> Vec<u8> {
        let mut out = Vec::new();
        let written = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut t = TcpHeader::new(sport, dport, 0x0102_0304, 64240);
                t.fin = flags & tcp_flags::FIN != 0;
                t.syn = flags & tcp_flags::SYN != 0;
                t.rst = flags & tcp_flags::RST != 0;
                t.psh = flags & tcp_flags::PSH != 0;
                t.ack = flags & tcp_flags::ACK != 0;
                if t.ack {
                    t.acknowledgment_number = 0x0a0b_0c0d;
                }
                step.tcp_header(t).write(&mut out, &self.payload)
            }
            L4::Udp { sport, dport } => step.udp(sport, dport).write(&mut out, &self.payload),
            L4::Icmp { kind, code, rest } if self.src.is_ipv4() => step
                .icmpv4_raw(kind, code, rest)
                .write(&mut out, &self.payload),
            L4::Icmp { kind, code, rest } => step
                .icmpv6_raw(kind, code, rest)
                .write(&mut out, &self.payload),
        };
        written.expect("etherparse writes into a Vec");
        out
    }
}

/// The UDP payload of a peer message of `kind` with `body_len` bytes between the 28-byte header
/// and the 16-byte tag, laid out as the daemon's `peers::seal` does: magic, kind, three zero bytes,
/// sender id, epoch, sequence number, body, tag. The tag is a fixed pattern: the data plane does not
/// check it. `body_len` 0 is an echo probe's size ([`PEER_ECHO_LEN`]).
pub fn peer_payload(kind: u8, body_len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(PEER_ECHO_LEN + body_len);
    b.extend_from_slice(&PEER_MAGIC);
    b.extend_from_slice(&[kind, 0, 0, 0]);
    b.extend_from_slice(&2u32.to_be_bytes());
    b.extend_from_slice(&7u64.to_be_bytes());
    b.extend_from_slice(&42u64.to_be_bytes());
    b.extend(std::iter::repeat_n(0x5a, body_len));
    b.extend((0..16u8).map(|i| 0xa0 | i));
    b
}

/// A peer message of `kind` from [`PEER4`] to this host's [`PEER_PORT`] (an echo probe for
/// `PEER_KIND_ECHO`), `body_len` bytes longer than an echo probe.
pub fn peer_message(kind: u8, body_len: usize) -> Packet {
    Packet::udp(
        SocketAddr::new(PEER4.into(), PEER_SPORT),
        SocketAddr::new(HOST4.into(), PEER_PORT),
    )
    .with_payload(&peer_payload(kind, body_len))
}

/// What the data plane sends back for the IPv4 echo probe `probe`, built independently of it: the
/// same frame with MACs, addresses and ports swapped (VLAN tag, TOS, TTL, id, DF and options kept),
/// the kind byte `PEER_KIND_ECHO_REPLY`, a correct IPv4 header checksum (etherparse's) and UDP
/// checksum 0 ("none").
pub fn peer_echo_reply(probe: &Packet) -> Vec<u8> {
    let L4::Udp { sport, dport } = probe.l4 else {
        panic!("an echo probe is UDP");
    };
    assert!(probe.src.is_ipv4(), "echo probes are IPv4");
    let mut reply = probe.clone();
    reply.src_mac = probe.dst_mac;
    reply.dst_mac = probe.src_mac;
    reply.src = probe.dst;
    reply.dst = probe.src;
    reply.l4 = L4::Udp {
        sport: dport,
        dport: sport,
    };
    reply.payload[4] = PEER_KIND_ECHO_REPLY;
    let mut out = reply.build();
    let l3 = l3_offset(&out);
    let udp = l3 + usize::from(out[l3] & 0x0f) * 4;
    out[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    out
}

/// The owner query the data plane hands up for the flow `client` → `vip` of `proto` (TCP/UDP) of
/// virtual service `vs_id`.
pub fn owner_query(client: SocketAddr, vip: SocketAddr, proto: u8, vs_id: u32) -> OwnerQuery {
    let (family, src_be) = ip_be(client.ip());
    let (vip_family, dst_be) = ip_be(vip.ip());
    assert_eq!(family, vip_family, "{client} and {vip}: one family");
    OwnerQuery {
        vs_id,
        family,
        proto,
        _pad: 0,
        src_be,
        dst_be,
        sport_be: client.port().to_be(),
        dport_be: vip.port().to_be(),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`, which the rate limits use.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    u64::try_from(t.tv_sec()).expect("after boot") * 1_000_000_000
        + u64::try_from(t.tv_nsec()).expect("0..1e9")
}

/// Pins the calling thread to the CPU it is on, so that every test run after this meets the same
/// per-CPU state (the rate limits are per CPU). Returns that CPU.
pub fn pin_to_this_cpu() -> Result<usize> {
    use nix::sched::{CpuSet, sched_getcpu, sched_setaffinity};
    let cpu = sched_getcpu().context("sched_getcpu")?;
    let mut set = CpuSet::new();
    set.set(cpu).context("CpuSet::set")?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("sched_setaffinity")?;
    Ok(cpu)
}

/// A connection-table key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    V4(FlowV4),
    V6(FlowV6),
}

impl Flow {
    /// The key of the flow `client` → `vip` (both of one family).
    pub fn new(client: SocketAddr, vip: SocketAddr, proto: u8) -> Flow {
        match (client.ip(), vip.ip()) {
            (IpAddr::V4(c), IpAddr::V4(v)) => Flow::V4(FlowV4 {
                src_be: v4_be(c),
                dst_be: v4_be(v),
                sport_be: client.port().to_be(),
                dport_be: vip.port().to_be(),
                proto,
                _pad: [0; 3],
            }),
            (IpAddr::V6(c), IpAddr::V6(v)) => Flow::V6(FlowV6 {
                src_be: v6_be(c),
                dst_be: v6_be(v),
                sport_be: client.port().to_be(),
                dport_be: vip.port().to_be(),
                proto,
                _pad: [0; 3],
            }),
            _ => panic!("{client} and {vip} are of different families"),
        }
    }

    /// The flow hash the data plane computes (`lb_common::hash`).
    pub fn hash(&self) -> u32 {
        match self {
            Flow::V4(f) => flow_hash_v4(f),
            Flow::V6(f) => flow_hash_v6(f),
        }
    }
}

/// Offset of the IP header: 14, or 18 behind one 802.1Q / 802.1ad tag.
pub fn l3_offset(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x81, 0x00] | [0x88, 0xa8]) => 18,
        _ => 14,
    }
}

/// `frame` with its destination and source MAC replaced: what an `XDP_TX` to an L2 engine sends.
pub fn rewrite_macs(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

/// The Ethernet header (with `frame`'s VLAN tag, if any) of an encapsulated copy of `frame`.
fn outer_l2(frame: &[u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    if l3_offset(frame) == 18 {
        out.extend_from_slice(&frame[12..16]);
    }
    out.extend_from_slice(&ethertype.to_be_bytes());
    out
}

/// The ICMP "fragmentation needed" the primary sends back for the too-big IPv4 `frame` (a client's
/// packet to a VIP), built independently of the program: MACs swapped, VLAN tag kept, an IPv4
/// header from the VIP to the client (TTL 64, no DF, id 0), type 3 code 4 with `next_hop_mtu`,
/// quoting the first 56 bytes of the packet from its IP header on.
pub fn icmp_frag_needed(frame: &[u8], next_hop_mtu: u16) -> Vec<u8> {
    use etherparse::{Icmpv4Header, Icmpv4Type, icmpv4::DestUnreachableHeader};
    let l3 = l3_offset(frame);
    let quote = &frame[l3..l3 + 56];
    let client: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().unwrap();
    let vip: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().unwrap();
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu,
        }),
        quote,
    );
    let len = u16::try_from(icmp.header_len() + quote.len()).unwrap();
    let mut ip = Ipv4Header::new(len, 64, IpNumber::ICMP, vip, client).unwrap();
    ip.dont_fragment = false;
    ip.identification = 0;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..l3]);
    ip.write(&mut out).unwrap();
    icmp.write(&mut out).unwrap();
    out.extend_from_slice(quote);
    out
}

/// The ICMPv6 "packet too big" for the too-big IPv6 `frame`, built independently of the program:
/// MACs swapped, VLAN tag kept, an IPv6 header from the VIP to the client (hop limit 64), type 2
/// with `mtu`, quoting the first 200 bytes of the packet from its IPv6 header on.
pub fn icmpv6_packet_too_big(frame: &[u8], mtu: u32) -> Vec<u8> {
    use etherparse::{Icmpv6Header, Icmpv6Type};
    let l3 = l3_offset(frame);
    let quote = &frame[l3..l3 + 200];
    let client: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().unwrap();
    let vip: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().unwrap();
    let icmp =
        Icmpv6Header::with_checksum(Icmpv6Type::PacketTooBig { mtu }, vip, client, quote).unwrap();
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: u16::try_from(icmp.header_len() + quote.len()).unwrap(),
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: vip,
        destination: client,
    };
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..l3]);
    ip.write(&mut out).unwrap();
    icmp.write(&mut out).unwrap();
    out.extend_from_slice(quote);
    out
}

/// `frame` (IPv4) inside IP-in-IP as the tunnel path must send it: a new Ethernet header to `dst_mac`
/// from `src_mac` (VLAN tag kept), an outer IPv4 header from `outer_src` to `outer_dst` (TOS and DF
/// copied from the inner header, id 0, TTL 64, protocol 4), then the original IP packet.
/// Built with etherparse, independently of the data plane's code.
pub fn ipip(
    frame: &[u8],
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
) -> Vec<u8> {
    let inner_ip = &frame[l3_offset(frame)..];
    let (inner, _) = Ipv4Header::from_slice(inner_ip).expect("an IPv4 frame");
    let mut outer = Ipv4Header::new(
        0,
        64,
        IpNumber::IPV4,
        outer_src.octets(),
        outer_dst.octets(),
    )
    .expect("valid");
    outer.total_len = inner.total_len + 20;
    outer.dscp = inner.dscp;
    outer.ecn = inner.ecn;
    outer.identification = 0;
    outer.dont_fragment = inner.dont_fragment;
    outer.header_checksum = outer.calc_header_checksum();
    let mut out = outer_l2(frame, dst_mac, src_mac, 0x0800);
    out.extend_from_slice(&outer.to_bytes());
    out.extend_from_slice(inner_ip);
    out
}

/// `frame` (IPv6) inside IPv6-in-IPv6: a new Ethernet header (VLAN tag kept), an outer IPv6 header
/// (traffic class 0, `flow_label`, payload length = the inner packet, next header 41, hop limit 64),
/// then the original IP packet.
pub fn ip6ip6(
    frame: &[u8],
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    outer_src: Ipv6Addr,
    outer_dst: Ipv6Addr,
    flow_label: u32,
) -> Vec<u8> {
    let inner_ip = &frame[l3_offset(frame)..];
    let (inner, _) = Ipv6Header::from_slice(inner_ip).expect("an IPv6 frame");
    let outer = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::try_new(flow_label).expect("20 bits"),
        payload_length: inner.payload_length + 40,
        next_header: IpNumber::IPV6,
        hop_limit: 64,
        source: outer_src.octets(),
        destination: outer_dst.octets(),
    };
    let mut out = outer_l2(frame, dst_mac, src_mac, 0x86dd);
    out.extend_from_slice(&outer.to_bytes());
    out.extend_from_slice(inner_ip);
    out
}

/// An ARP request (who has `target`?) from the router.
pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&ROUTER4.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// `frame` (IPv6) with extension headers inserted between the IPv6 header and its payload: one 8-byte
/// header per entry of `kinds` (hop-by-hop 0, routing 43, destination options 60), chained in order.
pub fn with_ipv6_ext(frame: &[u8], kinds: &[u8]) -> Vec<u8> {
    let l3 = l3_offset(frame);
    let upper = frame[l3 + 6];
    let mut out = frame[..l3 + 40].to_vec();
    let added = u16::try_from(8 * kinds.len()).expect("a few headers");
    let payload_len = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + added;
    out[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    if let Some(first) = kinds.first() {
        out[l3 + 6] = *first;
    }
    for (i, _) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(upper);
        // Length 0 (8 bytes); a PadN option fills the rest (for routing headers: type 0, no segments left).
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[l3 + 40..]);
    out
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// One test case: frames to run first (`setup`, results ignored), then `input`, whose verdict, output
/// and reason-counter movement must match exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fixture {
    pub description: String,
    pub setup: Vec<Vec<u8>>,
    pub input: Vec<u8>,
    pub expected_action: u32,
    /// The exact frame the program leaves behind (`None`: not checked).
    pub expected_output: Option<Vec<u8>>,
    /// Every reason counter that must move for `input`, with its increase; all others must stay.
    pub expected_reasons: Vec<(Reason, u64)>,
    /// Interface the frames arrive on (`None`: the kernel's default for test runs, `lo`).
    pub ingress_ifindex: Option<u32>,
}

impl Fixture {
    pub fn new(description: impl Into<String>, input: Vec<u8>, expected_action: u32) -> Fixture {
        Fixture {
            description: description.into(),
            setup: Vec::new(),
            input,
            expected_action,
            expected_output: None,
            expected_reasons: Vec::new(),
            ingress_ifindex: None,
        }
    }

    /// The program must leave the frame exactly as it came.
    #[must_use]
    pub fn unchanged(mut self) -> Fixture {
        self.expected_output = Some(self.input.clone());
        self
    }

    #[must_use]
    pub fn output(mut self, frame: Vec<u8>) -> Fixture {
        self.expected_output = Some(frame);
        self
    }

    /// Each of `reasons` must move by one (a reason listed twice: by two), nothing else.
    #[must_use]
    pub fn reasons(mut self, reasons: &[Reason]) -> Fixture {
        self.expected_reasons = Vec::new();
        for r in reasons {
            match self.expected_reasons.iter_mut().find(|(x, _)| x == r) {
                Some((_, n)) => *n += 1,
                None => self.expected_reasons.push((*r, 1)),
            }
        }
        self
    }

    #[must_use]
    pub fn after(mut self, setup: Vec<Vec<u8>>) -> Fixture {
        self.setup = setup;
        self
    }

    #[must_use]
    pub fn on_ingress(mut self, ifindex: u32) -> Fixture {
        self.ingress_ifindex = Some(ifindex);
        self
    }
}

/// What one program run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    /// The frame after the program (what `XDP_TX` would send, or what the stack would get).
    pub output: Vec<u8>,
}

/// A hex dump of `bytes`, with a marker at the first byte that differs from `other` (if given).
fn hex_dump(label: &str, bytes: &[u8], other: Option<&[u8]>) -> String {
    let first = other.map(|o| {
        bytes
            .iter()
            .zip(o)
            .position(|(x, y)| x != y)
            .unwrap_or(bytes.len().min(o.len()))
    });
    let mut s = format!("{label} ({} bytes", bytes.len());
    if let Some(f) = first {
        let _ = write!(s, ", first difference at {f}");
    }
    s.push_str("):\n");
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "  {:04x}:", i * 16);
        for (j, b) in chunk.iter().enumerate() {
            let mark = if Some(i * 16 + j) == first { '>' } else { ' ' };
            let _ = write!(s, "{mark}{b:02x}");
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The test data plane

/// Interfaces for `Tables::plan` without touching the kernel.
#[derive(Clone, Debug, Default)]
pub struct FakeLinks(pub BTreeMap<String, Link>);

impl Links for FakeLinks {
    fn link(&self, name: &str) -> Result<Link, PlanError> {
        self.0
            .get(name)
            .copied()
            .ok_or_else(|| PlanError::Interface {
                name: name.into(),
                reason: "no such interface (fake links)".into(),
            })
    }
}

/// The links of [`STANDARD_CONFIG`]: `eth0` (fake ifindex, [`OUR_MAC`]) and `lo` (its real ifindex, so
/// the devmap accepts it, with [`LO_LINK_MAC`]).
pub fn standard_links() -> Result<FakeLinks> {
    let lo = nix::net::if_::if_nametoindex("lo").context("ifindex of lo")?;
    Ok(FakeLinks(BTreeMap::from([
        (
            "eth0".to_owned(),
            Link {
                ifindex: 0x7fff_0001,
                mac: OUR_MAC,
                mtu: LINK_MTU,
            },
        ),
        (
            "lo".to_owned(),
            Link {
                ifindex: lo,
                mac: LO_LINK_MAC,
                mtu: LINK_MTU,
            },
        ),
    ])))
}

/// The interface each testbed creates in its namespace besides `lo`.
const OTHER_IFACE: &str = "fx0";

/// The ifindex of an interface other than `lo` (an ingress that is not engine 5's egress), in the
/// namespace of the calling thread's testbed.
pub fn other_ifindex() -> Result<u32> {
    nix::net::if_::if_nametoindex(OTHER_IFACE)
        .with_context(|| format!("ifindex of {OTHER_IFACE} (made by Testbed::with_config)"))
}

const PIN_PREFIX: &str = "lbfix-";

/// Removes pin directories of fixture runs whose process is gone (a killed run cannot clean up).
fn remove_stale_pin_dirs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PIN_PREFIX)
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn object() -> Result<&'static [u8]> {
    static OBJECT: OnceLock<Vec<u8>> = OnceLock::new();
    if let Some(o) = OBJECT.get() {
        return Ok(o);
    }
    let path = crate::xdp_object();
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (build it with `cargo xtask build-ebpf`, or set LB_XDP_OBJECT)",
            path.display()
        )
    })?;
    Ok(OBJECT.get_or_init(|| bytes))
}

/// A loaded (not attached) data plane with its own pin directory, configured through the daemon's
/// planning code. Dropping it removes the pin directory.
pub struct Testbed {
    pub dp: Dataplane,
    pub config: Config,
    pub tables: Tables,
    pub links: FakeLinks,
    pin_dir: PathBuf,
    /// A listener (TCP) or bound socket (UDP) on every virtual service's VIP:port, in the testbed's
    /// network namespace: the program passes a new flow up only where a socket would take it.
    sockets: Vec<socket2::Socket>,
}

impl Testbed {
    /// A data plane with [`STANDARD_CONFIG`].
    pub fn new() -> Result<Testbed> {
        Testbed::with_config(STANDARD_CONFIG)
    }

    /// A data plane with `config` (a variant of [`STANDARD_CONFIG`]; same interfaces).
    pub fn with_config(config: &str) -> Result<Testbed> {
        static ONCE: OnceLock<()> = OnceLock::new();
        static N: AtomicU32 = AtomicU32::new(0);
        ONCE.get_or_init(remove_stale_pin_dirs);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/{PIN_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        // A pid reused after a killed run: never load its tables.
        let _ = std::fs::remove_dir_all(&pin_dir);
        // The program looks up sockets in the namespace of the test run's thread: give this thread a
        // namespace of its own (nothing of the host's, no clash between parallel testbeds), with a
        // second interface to arrive on (`other_ifindex`).
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare a network namespace for the testbed")?;
        crate::cmd::run(&[
            "ip",
            "link",
            "add",
            OTHER_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "fxpeer",
        ])?;
        let links = standard_links()?;
        let config = Config::parse(config).context("parsing the test configuration")?;
        let tables = Tables::plan(&config, &links)?;
        let d = &config.daemon;
        let dp = Dataplane::load_with(
            object()?,
            &pin_dir,
            d.max_virtual_services,
            d.conn_table_size,
            d.persist_table_size,
        )
        .context("loading the XDP object")?;
        let mut tb = Testbed {
            dp,
            config,
            tables: Tables::default(),
            links,
            pin_dir,
            sockets: Vec::new(),
        };
        tb.dp
            .apply(&Changes::between(None, &tables))
            .context("applying the configuration")?;
        tb.tables = tables;
        tb.open_sockets()?;
        Ok(tb)
    }

    /// Opens a socket on every virtual service's VIP:port (`IP_FREEBIND`: the VIPs are not local).
    pub fn open_sockets(&mut self) -> Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        self.sockets.clear();
        for vs in &self.config.virtual_services {
            let addr = SocketAddr::new(vs.vip, vs.port);
            let (ty, proto) = match vs.protocol {
                lb_daemon::config::Protocol::Tcp => (Type::STREAM, Protocol::TCP),
                lb_daemon::config::Protocol::Udp => (Type::DGRAM, Protocol::UDP),
            };
            let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
            if addr.is_ipv4() {
                s.set_freebind_v4(true)?;
            } else {
                s.set_freebind_v6(true)?;
            }
            s.bind(&addr.into())
                .with_context(|| format!("bind {addr} ({:?})", vs.protocol))?;
            if ty == Type::STREAM {
                s.listen(16)?;
            }
            self.sockets.push(s);
        }
        Ok(())
    }

    /// Closes every socket [`Testbed::open_sockets`] opened: as if the daemon were away.
    pub fn close_sockets(&mut self) {
        self.sockets.clear();
    }
    /// Plans `config` without applying it (to predict the ring after a reload).
    pub fn plan(&self, config: &str) -> Result<Tables> {
        Ok(Tables::plan(&Config::parse(config)?, &self.links)?)
    }

    /// Applies `config` the way a daemon reload does: only what changed since the current tables.
    pub fn reconfigure(&mut self, config: &str) -> Result<()> {
        let parsed = Config::parse(config)?;
        let tables = Tables::plan(&parsed, &self.links)?;
        self.apply_tables(tables)?;
        self.config = parsed;
        Ok(())
    }

    /// Applies hand-made tables (states no valid configuration produces), as a diff.
    pub fn apply_tables(&mut self, tables: Tables) -> Result<()> {
        self.dp
            .apply(&Changes::between(Some(&self.tables), &tables))?;
        self.tables = tables;
        Ok(())
    }

    /// Runs the program once on `frame` (ingress: the kernel's default, `lo`).
    pub fn run(&self, frame: &[u8]) -> Result<Outcome, ProgramError> {
        self.run_ctx(frame, None)
    }

    /// Runs the program once on `frame` as if it arrived on interface `ingress_ifindex` (which must exist).
    pub fn run_on(&self, frame: &[u8], ingress_ifindex: u32) -> Result<Outcome, ProgramError> {
        self.run_ctx(frame, Some(ingress_ifindex))
    }

    fn run_ctx(&self, frame: &[u8], ingress: Option<u32>) -> Result<Outcome, ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let len = u32::try_from(frame.len()).expect("a frame fits u32");
        let ctx: Vec<u8> = [0, len, 0, ingress.unwrap_or(0), 0, 0]
            .iter()
            .flat_map(|w: &u32| w.to_ne_bytes())
            .collect();
        let r = self.dp.program().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ingress.map(|_| ctx.as_slice()),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Outcome {
            action: r.return_value,
            output: out,
        })
    }

    /// Every reason counter (summed over CPUs), indexed by reason number.
    pub fn reason_counts(&self) -> Result<Vec<u64>> {
        let mut v = vec![0; REASON_COUNT as usize];
        for (r, n) in self.dp.counters.reasons()? {
            v[r as usize] = n;
        }
        Ok(v)
    }

    /// The loaded program's map `name`, found through the kernel (which keeps 15 characters of a
    /// map's name): for maps [`Dataplane`] keeps no handle on, such as the rate-limit state.
    pub fn program_map(&self, name: &str) -> Result<MapData> {
        let short = &name[..name.len().min(15)];
        let ids = self
            .dp
            .program()
            .info()?
            .map_ids()?
            .context("the kernel does not list a program's maps")?;
        for id in ids {
            let map = MapData::from_id(id)?;
            if map.info()?.name_as_str() == Some(short) {
                return Ok(map);
            }
        }
        bail!("the program uses no map named {name}")
    }

    /// Sets the state of the per-CPU GCRA rate limit `map` (`PEER_ECHO_RATE`, `OWNER_QUERY_RATE`,
    /// `TOO_BIG_RATE`: the theoretical arrival time, in `bpf_ktime_get_ns` time) on every CPU.
    pub fn set_rate_state(&self, map: &str, tat_ns: u64) -> Result<()> {
        let mut rate: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(self.program_map(map)?))?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        rate.set(0, PerCpuValues::try_from(vec![tat_ns; cpus])?, 0)?;
        Ok(())
    }

    /// The oldest owner query waiting in the `OWNER_QUERIES` ring buffer (taking it frees its room).
    pub fn next_owner_query(&mut self) -> Option<OwnerQuery> {
        let ring = self
            .dp
            .owner_queries
            .as_mut()
            .expect("the testbed keeps the owner-query ring");
        let item = ring.next()?;
        assert_eq!(
            item.len(),
            std::mem::size_of::<OwnerQuery>(),
            "an owner query record"
        );
        // SAFETY: `OwnerQuery` is plain old data of exactly this many bytes; read unaligned.
        Some(unsafe { item.as_ptr().cast::<OwnerQuery>().read_unaligned() })
    }

    /// Every owner query waiting in the ring buffer, oldest first (the ring is empty afterwards).
    pub fn owner_queries(&mut self) -> Vec<OwnerQuery> {
        std::iter::from_fn(|| self.next_owner_query()).collect()
    }

    /// Runs `fx` and compares; an error describes every mismatch.
    pub fn verify(&self, fx: &Fixture) -> Result<Outcome> {
        for f in &fx.setup {
            self.run_ctx(f, fx.ingress_ifindex)
                .with_context(|| format!("{}: setup frame", fx.description))?;
        }
        let before = self.reason_counts()?;
        let got = self
            .run_ctx(&fx.input, fx.ingress_ifindex)
            .with_context(|| format!("{}: test_run", fx.description))?;
        let after = self.reason_counts()?;
        let moved: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .filter_map(|r| {
                let d = after[*r as usize] - before[*r as usize];
                (d != 0).then_some((*r, d))
            })
            .collect();
        let mut expected = fx.expected_reasons.clone();
        expected.sort_by_key(|(r, _)| *r as u32);
        let mut problems = Vec::new();
        if got.action != fx.expected_action {
            problems.push(format!(
                "verdict {} ({}), expected {} ({})",
                xdp::name(got.action),
                got.action,
                xdp::name(fx.expected_action),
                fx.expected_action
            ));
        }
        if let Some(want) = &fx.expected_output
            && *want != got.output
        {
            problems.push(format!(
                "output differs\n{}{}",
                hex_dump("got", &got.output, Some(want)),
                hex_dump("expected", want, Some(&got.output))
            ));
        }
        if moved != expected {
            let show = |v: &[(Reason, u64)]| {
                v.iter()
                    .map(|(r, n)| format!("{}+{n}", r.label()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            problems.push(format!(
                "reason counters moved [{}], expected [{}]",
                show(&moved),
                show(&expected)
            ));
        }
        if !problems.is_empty() {
            bail!(
                "fixture {:?}:\n  {}\n{}",
                fx.description,
                problems.join("\n  "),
                hex_dump("input", &fx.input, None)
            );
        }
        Ok(got)
    }

    /// [`Testbed::verify`], panicking (at the caller) on a mismatch.
    #[track_caller]
    pub fn check(&self, fx: &Fixture) -> Outcome {
        match self.verify(fx) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Checks that `frame` is passed up unchanged and that exactly `reason` counts it.
    #[track_caller]
    pub fn check_pass(
        &self,
        description: impl Into<String>,
        frame: Vec<u8>,
        reason: Reason,
    ) -> Outcome {
        self.check(
            &Fixture::new(description, frame, xdp::PASS)
                .unchanged()
                .reasons(&[reason]),
        )
    }

    /// The engine the connection table records for `flow`, if any.
    pub fn conn_owner(&self, flow: &Flow) -> Option<u32> {
        match flow {
            Flow::V4(f) => self.dp.conn_v4.get(f, 0).ok().map(|e| e.engine_id),
            Flow::V6(f) => self.dp.conn_v6.get(f, 0).ok().map(|e| e.engine_id),
        }
    }

    /// The engine the persistence table holds for `client` on `vs_id`, if any.
    pub fn persisted(&self, vs_id: u32, client: IpAddr) -> Option<u32> {
        let key = lb_common::PersistKey {
            client_be: ip_be(client).1,
            vs_id,
        };
        self.dp.persist.get(&key, 0).ok().map(|e| e.engine_id)
    }

    /// The engine the applied ring of `vs_id` names for `hash`.
    pub fn ring_owner(&self, vs_id: u32, hash: u32) -> u32 {
        ring_owner(&self.tables, vs_id, hash)
    }

    /// Client ports (from 1024 up) of `client` → `vip` whose flows the current ring of `vs_id` gives
    /// to `engine`.
    pub fn ports_to(
        &self,
        vs_id: u32,
        client: IpAddr,
        vip: SocketAddr,
        proto: u8,
        engine: u32,
    ) -> impl Iterator<Item = u16> + '_ {
        ports_to(&self.tables, vs_id, client, vip, proto, engine)
    }

    /// The virtual service `pkt` is addressed to (TCP/UDP), from the configuration.
    pub fn vs_of(&self, pkt: &Packet) -> Option<u32> {
        let (port, proto) = match pkt.l4 {
            L4::Tcp { dport, .. } => (dport, PROTO_TCP),
            L4::Udp { dport, .. } => (dport, PROTO_UDP),
            L4::Icmp { .. } => return None,
        };
        let (family, addr_be) = ip_be(pkt.dst);
        let key = VipKey {
            addr_be,
            port_be: port.to_be(),
            proto,
            family,
        };
        self.tables.vips.get(&key).copied()
    }

    /// The oracle for a new (unrecorded) TCP/UDP flow to a primary, non-persistent virtual service:
    /// the ring owner of its flow hash, and what reaching that engine looks like (default ingress).
    pub fn expect_new_flow(&self, pkt: &Packet) -> Fixture {
        let vs = self.vs_of(pkt).expect("a packet to a virtual service");
        let meta = self.tables.vs[&vs];
        assert!(
            meta.flags & VS_F_PRIMARY != 0 && meta.flags & VS_F_PERSIST == 0,
            "oracle covers primary, non-persistent services"
        );
        let owner = self.ring_owner(vs, pkt.flow().hash());
        let mut reasons = Vec::new();
        if matches!(pkt.l4, L4::Tcp { flags, .. } if flags & tcp_flags::SYN == 0) {
            reasons.push(Reason::TcpNonSynMiss);
        }
        reasons.push(Reason::ConnNew);
        let (action, output, last) = self.reach(owner, &pkt.build(), pkt.flow().hash());
        reasons.push(last);
        Fixture::new(
            format!("new flow {} -> {} (engine {owner})", pkt.client(), pkt.dst),
            pkt.build(),
            action,
        )
        .output(output)
        .reasons(&reasons)
    }

    /// Verdict, output and final reason of sending `frame` (flow hash `hash`) to `engine`, for the
    /// default test ingress (`lo`).
    pub fn reach(&self, engine: u32, frame: &[u8], hash: u32) -> (u32, Vec<u8>, Reason) {
        let e = self.tables.engines[&engine];
        let lo = self.links.0["lo"].ifindex;
        let tx_or_redirect = |tx| {
            if e.ifindex == 0 || e.ifindex == lo {
                (xdp::TX, tx)
            } else {
                (xdp::REDIRECT, Reason::RedirectL2)
            }
        };
        match e.mode {
            ENGINE_MODE_LOCAL => (xdp::PASS, frame.to_vec(), Reason::Local),
            ENGINE_MODE_L2 => {
                let (a, r) = tx_or_redirect(Reason::TxL2);
                (a, rewrite_macs(frame, e.dst_mac, e.src_mac), r)
            }
            _ => {
                let (a, _) = tx_or_redirect(Reason::TxTunnel);
                let out = if frame[l3_offset(frame)] >> 4 == 4 {
                    ipip(frame, e.dst_mac, e.src_mac, TUNNEL_SRC4, ENGINE4_V4)
                } else {
                    ip6ip6(
                        frame,
                        e.dst_mac,
                        e.src_mac,
                        TUNNEL_SRC6,
                        ENGINE4_V6,
                        hash & 0xf_ffff,
                    )
                };
                (a, out, Reason::TxTunnel)
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The engine ring `vs_id` of `tables` names for `hash`: `ring[hash % RING_SIZE]`, the ring being
/// `lb_common::maglev::build` over the service's active members (as `Tables::plan` builds it).
pub fn ring_owner(tables: &Tables, vs_id: u32, hash: u32) -> u32 {
    tables.rings[&vs_id][ring_slot(hash) as usize]
}

/// The engine the ring gives a flow `client` → `vip` of `proto` (non-persistent services).
pub fn flow_owner(
    tables: &Tables,
    vs_id: u32,
    client: SocketAddr,
    vip: SocketAddr,
    proto: u8,
) -> u32 {
    ring_owner(tables, vs_id, Flow::new(client, vip, proto).hash())
}

/// The engine the ring gives a client of a persistent service without a persistence entry.
pub fn client_owner(tables: &Tables, vs_id: u32, client: IpAddr) -> u32 {
    ring_owner(tables, vs_id, client_hash(&ip_be(client).1))
}

/// Client ports (1024 and up) whose flow `client:port` → `vip` the ring of `vs_id` gives to `engine`.
pub fn ports_to(
    tables: &Tables,
    vs_id: u32,
    client: IpAddr,
    vip: SocketAddr,
    proto: u8,
    engine: u32,
) -> impl Iterator<Item = u16> + '_ {
    (1024..=u16::MAX).filter(move |p| {
        flow_owner(tables, vs_id, SocketAddr::new(client, *p), vip, proto) == engine
    })
}

/// The `nth` client port of [`CLIENT4`] whose TCP flow to `VIP4:80` lands on `engine` in `tb`'s ring.
pub fn web_port(tb: &Testbed, engine: u32, nth: usize) -> u16 {
    tb.ports_to(
        VS_WEB,
        CLIENT4.into(),
        SocketAddr::new(VIP4.into(), 80),
        PROTO_TCP,
        engine,
    )
    .nth(nth)
    .expect("enough ports land on every engine")
}

/// Sockets of the standard services.
pub fn web4() -> SocketAddr {
    SocketAddr::new(VIP4.into(), 80)
}
pub fn web6() -> SocketAddr {
    SocketAddr::new(VIP6.into(), 80)
}
pub fn client4(port: u16) -> SocketAddr {
    SocketAddr::new(CLIENT4.into(), port)
}
pub fn client6(port: u16) -> SocketAddr {
    SocketAddr::new(CLIENT6.into(), port)
}

// ---------------------------------------------------------------------------------------------
// Fixtures shared with the benchmark (all against a `Testbed::new()`).

/// IPv4 TCP to an address that is no VIP: `XDP_PASS`, unchanged.
pub fn fx_non_vip() -> Fixture {
    let pkt = Packet::ack(
        client4(40000),
        SocketAddr::new(Ipv4Addr::new(10, 100, 0, 99).into(), 80),
    );
    Fixture::new("non-VIP IPv4 TCP passes", pkt.build(), xdp::PASS)
        .unchanged()
        .reasons(&[Reason::PassNotVip])
}

/// The SYN of a new flow to `VIP4:80` that the ring gives to L2 engine 2 (the `nth` such port):
/// `XDP_TX` with the MACs rewritten. Running it again is a connection hit.
pub fn fx_new_flow(tb: &Testbed, nth: usize) -> Fixture {
    let pkt = Packet::syn(client4(web_port(tb, E_L2_A, nth)), web4());
    let fx = tb.expect_new_flow(&pkt);
    assert_eq!(fx.expected_action, xdp::TX);
    fx
}

/// A mid-connection segment of a flow recorded for engine 2 (its SYN is the setup): `XDP_TX`.
pub fn fx_conn_hit(tb: &Testbed) -> Fixture {
    let port = web_port(tb, E_L2_A, 0);
    let syn = Packet::syn(client4(port), web4()).build();
    let ack = Packet::ack(client4(port), web4()).build();
    Fixture::new("connection hit to L2 engine 2", ack.clone(), xdp::TX)
        .after(vec![syn])
        .output(rewrite_macs(&ack, engine_mac(E_L2_A), OUR_MAC))
        .reasons(&[Reason::ConnHit, Reason::TxL2])
}
