//! Who answers ARP / ND for a VIP, and telling the segment when that changes.
//!
//! Every engine of a virtual service holds its VIP as a local address, because its proxy terminates
//! the connections steered to it. Only the primary may answer ARP and neighbour solicitations for
//! it, or the segment's clients and router would split the VIP's traffic among engines at random.
//! The convention (the lab's too):
//!
//! - **primary**: the VIP (/32 or /128) on the data interface (`eth0`). It answers ARP / ND for it,
//!   and on becoming primary it announces itself: gratuitous ARP (RFC 5227 announcement: an ARP
//!   request with sender = target = VIP) or an unsolicited neighbour advertisement (Override set,
//!   to `ff02::1`), sent 5 times over 4 s ([`ANNOUNCE_SCHEDULE`]), so that hosts holding the old
//!   primary's MAC switch at once instead of after their neighbour entry goes stale.
//! - **secondary**: the VIP on `lo`, with `arp_ignore=1` (answer only for addresses on the
//!   receiving interface) and `arp_announce=2` (never use the VIP as the source of its own ARP
//!   requests) on the data interface and `all`. IPv6 ND answers only for addresses on the
//!   receiving interface, so `lo` is enough there.
//!
//! [`VipAddresses`] moves the address over rtnetlink, adding it to the new place before removing it
//! from the old one, so sockets bound to the VIP never see it missing. Receivers: Linux updates an
//! existing neighbour entry from a gratuitous ARP (or an NA with Override) but creates none unless
//! `net.ipv4.conf.<if>.arp_accept=1` (`accept_untracked_na` for IPv6), so hosts that never talked
//! to the VIP simply ARP for it later and get the new primary's answer.
//!
//! The frames are built by pure functions ([`gratuitous_arp`], [`unsolicited_na`]) and sent on an
//! `AF_PACKET` socket ([`send_frame`]); [`announce`] runs the schedule as a task.

use std::{
    fmt, fs, io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::TryStreamExt;
use rtnetlink::{
    AddressMessageBuilder, Handle,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
        link::LinkAttribute,
    },
};
use socket2::{Domain, SockAddr, SockAddrStorage, Socket, Type};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// When [`announce`] sends, counted from its start: 5 frames over the first 4 s. The first goes
/// out at once; the repeats cover a lost frame and switches that learn slowly.
pub const ANNOUNCE_SCHEDULE: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// The loopback interface, where a secondary keeps the VIP.
pub const LOOPBACK: &str = "lo";

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// `ff02::1`, all nodes on the link.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Ethernet multicast for `ff02::1` (`33:33` + the low 32 bits).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Length of [`gratuitous_arp`]'s frame (Ethernet 14 + ARP 28; the driver pads to 60).
pub const GARP_LEN: usize = 42;
/// Length of [`unsolicited_na`]'s frame (Ethernet 14 + IPv6 40 + ICMPv6 NA 24 + option 8).
pub const NA_LEN: usize = 86;
const NA_ICMP_LEN: u16 = 32;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface {0} not found")]
    InterfaceNotFound(String),
    #[error("interface {0} has no Ethernet (6-byte) MAC address")]
    NoMac(String),
    #[error("cannot open a netlink socket: {0}")]
    Connection(#[source] io::Error),
    #[error("netlink: {op} {what}: {source}")]
    Netlink {
        /// `add`, `delete`, `list`, `look up`.
        op: &'static str,
        /// The address and interface (`10.100.0.10/32 on eth0`) or the interface.
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot set sysctl {}: {source}", path.display())]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`VipAddresses::place`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The VIP was in the wanted place only: nothing changed.
    Unchanged,
    /// The VIP was nowhere; it was added to the wanted place.
    Added,
    /// The VIP was in the other place; it was added to the wanted one, then removed from the other.
    Moved,
}

/// Where the VIP is now (both at once only for a moment during a move, or after a crash in one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub interface: bool,
    pub lo: bool,
}

/// Frames sent by [`announce`], for `/metrics`.
#[derive(Debug, Default)]
pub struct AnnounceCounters {
    pub garp_sent: AtomicU64,
    pub na_sent: AtomicU64,
    pub send_errors: AtomicU64,
}

/// The VIP addresses of one data interface (and `lo`), managed over rtnetlink.
///
/// Dropping it stops its netlink connection task.
pub struct VipAddresses {
    handle: Handle,
    connection: JoinHandle<()>,
    interface: String,
    ifindex: u32,
    lo_index: u32,
    mac: [u8; 6],
}

impl fmt::Debug for VipAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VipAddresses")
            .field("interface", &self.interface)
            .field("ifindex", &self.ifindex)
            .field("lo_index", &self.lo_index)
            .field("mac", &format_mac(self.mac))
            .finish_non_exhaustive()
    }
}

impl Drop for VipAddresses {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl VipAddresses {
    /// Opens a netlink connection (its task is spawned on the current tokio runtime), resolves
    /// `interface` and `lo`, and sets `arp_ignore=1` / `arp_announce=2` on `interface` and `all`.
    /// Everything happens in the network namespace of the calling thread.
    pub async fn new(interface: &str) -> Result<VipAddresses, AnnounceError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(AnnounceError::Connection)?;
        let connection = tokio::spawn(connection);
        // From here on, dropping `this` (on an error) stops the connection task.
        let mut this = VipAddresses {
            handle,
            connection,
            interface: interface.to_owned(),
            ifindex: 0,
            lo_index: 0,
            mac: [0; 6],
        };
        let (ifindex, mac) = this.link(interface).await?;
        this.ifindex = ifindex;
        this.mac = mac.ok_or_else(|| AnnounceError::NoMac(interface.to_owned()))?;
        this.lo_index = this.link(LOOPBACK).await?.0;
        for dev in [interface, "all"] {
            write_sysctl(dev, "arp_ignore", "1")?;
            write_sysctl(dev, "arp_announce", "2")?;
        }
        debug!(interface, ifindex, mac = %format_mac(this.mac), "VIP addresses ready");
        Ok(this)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Puts `vip` (/32 or /128) on the data interface (`on_interface`, a primary) or on `lo` (a
    /// secondary). Adds it to the new place first, then removes it from the other. Idempotent.
    /// IPv6 addresses are added with `IFA_F_NODAD`, usable at once.
    pub async fn place(&self, vip: IpAddr, on_interface: bool) -> Result<Placed, AnnounceError> {
        let now = self.location(vip).await?;
        let (want, other) = if on_interface {
            (self.ifindex, self.lo_index)
        } else {
            (self.lo_index, self.ifindex)
        };
        let (in_want, in_other) = if on_interface {
            (now.interface, now.lo)
        } else {
            (now.lo, now.interface)
        };
        if !in_want {
            self.add(vip, want).await?;
        }
        if in_other {
            self.delete(vip, other).await?;
        }
        Ok(match (in_want, in_other) {
            (true, false) => Placed::Unchanged,
            (false, false) => Placed::Added,
            (_, true) => Placed::Moved,
        })
    }

    /// Removes `vip` from both places (the virtual service is gone). Returns whether it was
    /// anywhere.
    pub async fn remove(&self, vip: IpAddr) -> Result<bool, AnnounceError> {
        let now = self.location(vip).await?;
        if now.interface {
            self.delete(vip, self.ifindex).await?;
        }
        if now.lo {
            self.delete(vip, self.lo_index).await?;
        }
        Ok(now.interface || now.lo)
    }

    /// Where `vip` (as a /32 or /128) is now.
    pub async fn location(&self, vip: IpAddr) -> Result<Location, AnnounceError> {
        let mut dump = self
            .handle
            .address()
            .get()
            .set_address_filter(vip)
            .set_prefix_length_filter(host_prefix(vip))
            .execute();
        let mut at = Location::default();
        loop {
            match dump.try_next().await {
                Ok(Some(msg)) => {
                    at.interface |= msg.header.index == self.ifindex;
                    at.lo |= msg.header.index == self.lo_index;
                }
                Ok(None) => return Ok(at),
                Err(source) => {
                    return Err(AnnounceError::Netlink {
                        op: "list",
                        what: format!("addresses {vip}"),
                        source,
                    });
                }
            }
        }
    }

    async fn add(&self, vip: IpAddr, index: u32) -> Result<(), AnnounceError> {
        let mut req = self.handle.address().add(index, vip, host_prefix(vip));
        if vip.is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => {}
            // Someone (another instance, an operator) was first: it is there, which is the point.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(AnnounceError::Netlink {
                    op: "add",
                    what: self.describe(vip, index),
                    source,
                });
            }
        }
        debug!(%vip, on = self.name_of(index), "VIP added");
        Ok(())
    }

    async fn delete(&self, vip: IpAddr, index: u32) -> Result<(), AnnounceError> {
        let msg = address_message(vip, index);
        match self.handle.address().del(msg).execute().await {
            Ok(()) => {}
            // Already gone.
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
            Err(source) => {
                return Err(AnnounceError::Netlink {
                    op: "delete",
                    what: self.describe(vip, index),
                    source,
                });
            }
        }
        debug!(%vip, on = self.name_of(index), "VIP removed");
        Ok(())
    }

    /// `(ifindex, MAC)` of `name`.
    async fn link(&self, name: &str) -> Result<(u32, Option<[u8; 6]>), AnnounceError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let msg = match links.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(AnnounceError::InterfaceNotFound(name.to_owned())),
            Err(e) if errno(&e) == Some(libc::ENODEV) => {
                return Err(AnnounceError::InterfaceNotFound(name.to_owned()));
            }
            Err(source) => {
                return Err(AnnounceError::Netlink {
                    op: "look up",
                    what: format!("interface {name}"),
                    source,
                });
            }
        };
        let mac = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        });
        Ok((msg.header.index, mac))
    }

    fn name_of(&self, index: u32) -> &str {
        if index == self.lo_index {
            LOOPBACK
        } else {
            &self.interface
        }
    }

    fn describe(&self, vip: IpAddr, index: u32) -> String {
        format!("{vip}/{} on {}", host_prefix(vip), self.name_of(index))
    }
}

fn host_prefix(vip: IpAddr) -> u8 {
    if vip.is_ipv4() { 32 } else { 128 }
}

fn address_message(vip: IpAddr, index: u32) -> AddressMessage {
    match vip {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, 32)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, 128)
            .build(),
    }
}

/// The positive errno of a netlink NACK.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn write_sysctl(dev: &str, key: &str, value: &str) -> Result<(), AnnounceError> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{dev}/{key}"));
    fs::write(&path, value).map_err(|source| AnnounceError::Sysctl { path, source })
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// An RFC 5227 ARP announcement for `vip` from `mac`: Ethernet broadcast, an ARP request
/// (op 1) with sender = target = `vip`, sender MAC `mac`, target MAC zero.
pub fn gratuitous_arp(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(GARP_LEN);
    f.extend_from_slice(&BROADCAST_MAC);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&1u16.to_be_bytes()); // op: request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f
}

/// An unsolicited neighbour advertisement for `vip` from `mac`: to `ff02::1` (`33:33:00:00:00:01`),
/// source `vip`, hop limit 255, Override set (Solicited and Router clear), target `vip`, and the
/// target link-layer address option (type 2) holding `mac`.
pub fn unsolicited_na(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(NA_LEN);
    f.extend_from_slice(&ALL_NODES_MAC);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6: version 6, traffic class 0, flow label 0.
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&NA_ICMP_LEN.to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    let icmp = f.len();
    f.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0]); // type, code, checksum (below)
    f.extend_from_slice(&[NA_FLAG_OVERRIDE, 0, 0, 0]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]); // length in units of 8 bytes
    f.extend_from_slice(&mac);
    let sum = icmpv6_checksum(&vip, &ALL_NODES, &f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The Internet checksum of `icmp` (its checksum field zero) under the IPv6 pseudo-header.
fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let len = u32::try_from(icmp.len()).unwrap_or(u32::MAX);
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&len.to_be_bytes());
    pseudo[39] = IPPROTO_ICMPV6;
    let words = |b: &[u8]| -> u64 {
        b.chunks(2)
            .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum()
    };
    let mut sum = words(&pseudo) + words(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let [.., hi, lo] = sum.to_be_bytes();
    !u16::from_be_bytes([hi, lo])
}

/// Sends one whole Ethernet frame out of interface `ifindex` (of the calling thread's network
/// namespace) on an `AF_PACKET` raw socket. Needs `CAP_NET_RAW`.
pub fn send_frame(ifindex: u32, frame: &[u8]) -> io::Result<()> {
    let index = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    // Protocol 0: the socket receives nothing, it only sends.
    let socket = Socket::new(Domain::PACKET, Type::RAW, None)?;
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: `sockaddr_ll` is one of this platform's `sockaddr_*` types and fits the storage.
    let ll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    ll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
    ll.sll_ifindex = index;
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or_default();
    // SAFETY: the storage holds an initialised `sockaddr_ll` (zeroed, then filled) of `len` bytes.
    let addr = unsafe { SockAddr::new(storage, len) };
    socket.bind(&addr)?;
    let sent = socket.send(frame)?;
    if sent == frame.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", frame.len()),
        ))
    }
}

/// Announces that this host now holds `vip` on interface `ifindex` with `mac`: a gratuitous ARP
/// (IPv4) or an unsolicited NA (IPv6) at each offset of [`ANNOUNCE_SCHEDULE`], every frame counted
/// in `counters` (sent or failed; a failure is logged and the schedule goes on).
///
/// The task runs on the current tokio runtime (call it from within one) in the network namespace
/// of the runtime's threads. A newer announcement for the same VIP supersedes an older one: the
/// caller keeps the handle per VIP and aborts the old one first (as it should when the VIP moves
/// away again, so a former primary stops claiming it).
pub fn announce(
    ifindex: u32,
    mac: [u8; 6],
    vip: IpAddr,
    counters: Arc<AnnounceCounters>,
) -> JoinHandle<()> {
    let (frame, kind) = match vip {
        IpAddr::V4(v4) => (gratuitous_arp(mac, v4), "gratuitous ARP"),
        IpAddr::V6(v6) => (unsolicited_na(mac, v6), "unsolicited NA"),
    };
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for at in ANNOUNCE_SCHEDULE {
            tokio::time::sleep_until(start + at).await;
            match send_frame(ifindex, &frame) {
                Ok(()) => {
                    let counter = if vip.is_ipv4() {
                        &counters.garp_sent
                    } else {
                        &counters.na_sent
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(%vip, ifindex, error = %e, "cannot send {kind}");
                }
            }
        }
        debug!(%vip, ifindex, "{kind} announcements done");
    })
}

#[cfg(test)]
mod tests {
    use etherparse::{
        ArpHardwareId, ArpOperation, EtherType, Icmpv6Type, IpNumber, NetSlice, SlicedPacket,
        TransportSlice,
    };

    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x0a, 0x4d, 0x00, 0x0b];

    #[test]
    fn gratuitous_arp_bytes() {
        let f = gratuitous_arp(MAC, Ipv4Addr::new(10, 100, 0, 10));
        #[rustfmt::skip]
        let want: [u8; GARP_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  0x02, 0x00, 0x0a, 0x4d, 0x00, 0x0b,  0x08, 0x06,
            0x00, 0x01,  0x08, 0x00,  6, 4,  0x00, 0x01,
            0x02, 0x00, 0x0a, 0x4d, 0x00, 0x0b,  10, 100, 0, 10,
            0, 0, 0, 0, 0, 0,                    10, 100, 0, 10,
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn gratuitous_arp_parses_as_an_announcement() {
        let vip = Ipv4Addr::new(192, 0, 2, 7);
        let f = gratuitous_arp(MAC, vip);
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
            panic!("no Ethernet II header: {p:?}");
        };
        assert_eq!(eth.destination(), BROADCAST_MAC);
        assert_eq!(eth.source(), MAC);
        assert_eq!(eth.ether_type(), EtherType::ARP);
        let Some(NetSlice::Arp(arp)) = &p.net else {
            panic!("no ARP: {p:?}");
        };
        let arp = arp.to_packet().try_eth_ipv4().unwrap();
        assert_eq!(arp.operation, ArpOperation::REQUEST);
        assert_eq!(arp.sender_mac, MAC);
        assert_eq!(arp.target_mac, [0; 6]);
        assert_eq!(arp.sender_ipv4_addr(), vip);
        assert_eq!(arp.target_ipv4_addr(), vip);
        assert_eq!(arp.to_arp_packet().hw_addr_type, ArpHardwareId::ETHERNET);
    }

    #[test]
    fn unsolicited_na_fields_and_checksum() {
        let vip: Ipv6Addr = "fd00:100::10".parse().unwrap();
        let f = unsolicited_na(MAC, vip);
        assert_eq!(f.len(), NA_LEN);
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
            panic!("no Ethernet II header: {p:?}");
        };
        assert_eq!(eth.destination(), ALL_NODES_MAC);
        assert_eq!(eth.source(), MAC);
        assert_eq!(eth.ether_type(), EtherType::IPV6);
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!("no IPv6: {p:?}");
        };
        let h = ip.header();
        assert_eq!(h.source_addr(), vip);
        assert_eq!(h.destination_addr(), ALL_NODES);
        assert_eq!(h.hop_limit(), 255);
        assert_eq!(h.next_header(), IpNumber::IPV6_ICMP);
        assert_eq!(h.payload_length(), 32);
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("no ICMPv6: {p:?}");
        };
        let Icmpv6Type::NeighborAdvertisement(na) = icmp.icmp_type() else {
            panic!("not a neighbour advertisement: {:?}", icmp.icmp_type());
        };
        assert!(na.r#override && !na.solicited && !na.router, "{na:?}");
        assert_eq!(icmp.code_u8(), 0);
        // etherparse's checksum over the same pseudo-header agrees.
        let want = icmp
            .header()
            .icmp_type
            .calc_checksum(vip.octets(), ALL_NODES.octets(), icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want);
        // Target and the target link-layer address option.
        let body = icmp.payload();
        assert_eq!(body.len(), 16 + 8);
        assert_eq!(&body[..16], &vip.octets());
        assert_eq!(&body[16..18], &[2, 1]);
        assert_eq!(&body[18..], &MAC);
        // And the Internet checksum of pseudo-header + message folds to all ones.
        let mut copy = f[54..].to_vec();
        let stored = u16::from_be_bytes([copy[2], copy[3]]);
        copy[2..4].copy_from_slice(&[0, 0]);
        assert_eq!(icmpv6_checksum(&vip, &ALL_NODES, &copy), stored);
    }

    #[test]
    fn unsolicited_na_bytes() {
        let vip: Ipv6Addr = "fd00:100::10".parse().unwrap();
        let f = unsolicited_na(MAC, vip);
        #[rustfmt::skip]
        let head: [u8; 22] = [
            0x33, 0x33, 0, 0, 0, 1,  0x02, 0x00, 0x0a, 0x4d, 0x00, 0x0b,  0x86, 0xdd,
            0x60, 0, 0, 0,  0x00, 0x20,  58, 255,
        ];
        assert_eq!(&f[..22], &head);
        assert_eq!(&f[22..38], &vip.octets());
        assert_eq!(&f[38..54], &ALL_NODES.octets());
        assert_eq!(&f[54..56], &[136, 0]);
        assert_eq!(&f[58..62], &[0x20, 0, 0, 0]);
    }

    #[test]
    fn checksum_matches_a_known_vector() {
        // The all-zero pseudo-header and message sum to 58 + 8 (next header, length): !66.
        let zero = Ipv6Addr::UNSPECIFIED;
        assert_eq!(icmpv6_checksum(&zero, &zero, &[0; 8]), !66);
        // Odd lengths pad with a zero byte.
        assert_eq!(icmpv6_checksum(&zero, &zero, &[0x01]), !(58 + 1 + 0x0100));
    }

    #[test]
    fn schedule_is_five_sends_over_four_seconds() {
        assert_eq!(ANNOUNCE_SCHEDULE.len(), 5);
        assert_eq!(ANNOUNCE_SCHEDULE[0], Duration::ZERO);
        assert_eq!(ANNOUNCE_SCHEDULE[4], Duration::from_secs(4));
        assert!(ANNOUNCE_SCHEDULE.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn errors_say_what_failed() {
        let e = AnnounceError::Sysctl {
            path: PathBuf::from("/proc/sys/net/ipv4/conf/eth9/arp_ignore"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(
            e.to_string()
                .contains("/proc/sys/net/ipv4/conf/eth9/arp_ignore"),
            "{e}"
        );
        assert_eq!(
            AnnounceError::InterfaceNotFound("eth9".into()).to_string(),
            "interface eth9 not found"
        );
    }

    #[tokio::test]
    async fn unknown_interface_is_a_clear_error() {
        // Needs only a netlink socket (no privileges): the lookup fails before any sysctl.
        match VipAddresses::new("nosuchif0").await {
            Err(AnnounceError::InterfaceNotFound(name)) => assert_eq!(name, "nosuchif0"),
            other => panic!("{other:?}"),
        }
    }
}
