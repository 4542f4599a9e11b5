//! The BGP messages the speaker sends and the checks of the peer's OPEN, as pure functions over
//! netgauze's message types (which encode and decode the wire format).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use lb_model::AS_TRANS;
use netgauze_bgp_pkt::{
    BgpMessage,
    capabilities::{BgpCapability, FourOctetAsCapability, MultiProtocolExtensionsCapability},
    community::Community,
    nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress},
    notification::{BgpNotificationMessage, CeaseError, OpenMessageError},
    open::{BgpOpenMessage, BgpOpenMessageParameter},
    path_attribute::{
        As4PathSegment, AsPath, AsPathSegmentType, Communities, LocalPreference, MpReach,
        MpUnreach, MultiExitDiscriminator, NextHop, Origin, PathAttribute, PathAttributeValue,
    },
    update::BgpUpdateMessage,
};
use netgauze_iana::address_family::AddressType;

/// A host route this engine announces: a VIP and its per-service attributes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub vip: IpAddr,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
}

/// What a session puts on every route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub local_asn: u32,
    pub peer_asn: u32,
    pub communities: Vec<u32>,
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
}

impl Attributes {
    fn internal(&self) -> bool {
        self.local_asn == self.peer_asn
    }
}

/// What both OPENs agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Seconds; 0: no keepalives and no hold timer.
    pub hold_time: u16,
    pub peer_id: Ipv4Addr,
}

/// Our OPEN: 4-octet AS, IPv4 and IPv6 unicast.
pub fn open(local_asn: u32, hold_time: u16, router_id: Ipv4Addr) -> BgpMessage {
    let my_as = u16::try_from(local_asn).unwrap_or(AS_TRANS);
    let caps = vec![
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv4Unicast,
        )),
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv6Unicast,
        )),
        BgpCapability::FourOctetAs(FourOctetAsCapability::new(local_asn)),
    ];
    BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        hold_time,
        router_id,
        vec![BgpOpenMessageParameter::new_capabilities(caps)],
    ))
}

/// Why a peer's OPEN is refused: the NOTIFICATION to send and the reason for the log.
#[derive(Debug)]
pub struct Refused {
    pub notification: BgpNotificationMessage,
    pub reason: String,
}

fn refused(notification: BgpNotificationMessage, reason: String) -> Refused {
    Refused {
        notification,
        reason,
    }
}

/// Checks the peer's OPEN against what is configured for it (RFC 4271 6.2, RFC 6793).
pub fn check_open(
    open: &BgpOpenMessage,
    peer_asn: u32,
    local_id: Ipv4Addr,
    local_hold: u16,
) -> Result<Negotiated, Refused> {
    if open.version() != 4 {
        return Err(refused(
            BgpNotificationMessage::OpenMessageError(OpenMessageError::UnsupportedVersionNumber {
                value: 4u16.to_be_bytes().into(),
            }),
            format!("BGP version {} (this speaker has 4)", open.version()),
        ));
    }
    let four_octet = open
        .capabilities()
        .iter()
        .any(|c| matches!(c, BgpCapability::FourOctetAs(_)));
    if !four_octet {
        return Err(refused(
            BgpNotificationMessage::OpenMessageError(OpenMessageError::UnsupportedCapability {
                value: [65, 4, 0, 0, 0, 0].into(),
            }),
            "the peer does not offer 4-octet AS numbers (RFC 6793)".into(),
        ));
    }
    let their_asn = open.my_asn4();
    if their_asn != peer_asn {
        return Err(refused(
            BgpNotificationMessage::OpenMessageError(OpenMessageError::BadPeerAs {
                value: Box::new([]),
            }),
            format!("the peer is AS {their_asn}, configured AS {peer_asn}"),
        ));
    }
    let hold = open.hold_time();
    if hold == 1 || hold == 2 {
        return Err(refused(
            BgpNotificationMessage::OpenMessageError(OpenMessageError::UnacceptableHoldTime {
                value: Box::new([]),
            }),
            format!("hold time {hold} s"),
        ));
    }
    let id = open.bgp_id();
    if id.is_unspecified() || (id == local_id) {
        return Err(refused(
            BgpNotificationMessage::OpenMessageError(OpenMessageError::BadBgpIdentifier {
                value: Box::new([]),
            }),
            format!("BGP identifier {id}"),
        ));
    }
    Ok(Negotiated {
        hold_time: hold.min(local_hold),
        peer_id: id,
    })
}

/// A Cease NOTIFICATION (RFC 4486 subcode 2, administrative shutdown) with a reason (RFC 8203).
pub fn cease(reason: &str) -> BgpMessage {
    let text = reason.as_bytes();
    // At most 128 octets, cut on a character boundary (RFC 8203: UTF-8).
    let len = (0..=text.len().min(128))
        .rev()
        .find(|&n| reason.is_char_boundary(n))
        .unwrap_or(0);
    let mut value = Vec::with_capacity(len + 1);
    value.push(u8::try_from(len).unwrap_or(128));
    value.extend_from_slice(&text[..len]);
    BgpMessage::Notification(BgpNotificationMessage::CeaseError(
        CeaseError::AdministrativeShutdown {
            value: value.into(),
        },
    ))
}

/// Builds a path attribute with the flags RFC 4271 gives its type.
fn attr(optional: bool, transitive: bool, value: PathAttributeValue) -> Option<PathAttribute> {
    PathAttribute::from(optional, transitive, false, false, value).ok()
}

/// Why a route cannot be announced on a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unannounceable {
    #[error("{0}: no IPv4 next hop on this session (set bgp.peers[].next_hop_v4)")]
    NoNextHopV4(IpAddr),
    #[error("{0}: no IPv6 next hop on this session (set bgp.peers[].next_hop_v6)")]
    NoNextHopV6(IpAddr),
    #[error("{0}: the attributes could not be built")]
    Attributes(IpAddr),
}

/// The UPDATE announcing `route` with `a`'s attributes.
pub fn announce(route: &Route, a: &Attributes) -> Result<BgpMessage, Unannounceable> {
    let bad = || Unannounceable::Attributes(route.vip);
    let mut attrs =
        vec![attr(false, true, PathAttributeValue::Origin(Origin::IGP)).ok_or_else(bad)?];
    let path = if a.internal() {
        AsPath::As4PathSegments(Box::new([]))
    } else {
        AsPath::As4PathSegments(Box::new([As4PathSegment::new(
            AsPathSegmentType::AsSequence,
            vec![a.local_asn],
        )]))
    };
    attrs.push(attr(false, true, PathAttributeValue::AsPath(path)).ok_or_else(bad)?);
    if !a.internal()
        && let Some(med) = route.med
    {
        attrs.push(
            attr(
                true,
                false,
                PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(med)),
            )
            .ok_or_else(bad)?,
        );
    }
    if a.internal() {
        let pref = route.local_pref.unwrap_or(100);
        attrs.push(
            attr(
                false,
                true,
                PathAttributeValue::LocalPreference(LocalPreference::new(pref)),
            )
            .ok_or_else(bad)?,
        );
    }
    if !a.communities.is_empty() {
        let list: Vec<Community> = a.communities.iter().map(|c| Community::new(*c)).collect();
        // Over 255 octets (64 communities) the attribute needs the Extended Length flag: netgauze
        // writes a 2-octet length then but does not set the flag itself.
        let extended = list.len() * 4 > usize::from(u8::MAX);
        attrs.push(
            PathAttribute::from(
                true,
                true,
                false,
                extended,
                PathAttributeValue::Communities(Communities::new(list)),
            )
            .map_err(|_| bad())?,
        );
    }
    match route.vip {
        IpAddr::V4(v4) => {
            let hop = a
                .next_hop_v4
                .ok_or(Unannounceable::NoNextHopV4(route.vip))?;
            attrs.push(
                attr(false, true, PathAttributeValue::NextHop(NextHop::new(hop)))
                    .ok_or_else(bad)?,
            );
            let nlri = v4_nlri(v4).ok_or_else(bad)?;
            Ok(BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                attrs,
                vec![nlri],
            )))
        }
        IpAddr::V6(v6) => {
            let hop = a
                .next_hop_v6
                .ok_or(Unannounceable::NoNextHopV6(route.vip))?;
            let nlri = v6_nlri(v6).ok_or_else(bad)?;
            attrs.push(
                attr(
                    true,
                    false,
                    PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                        next_hop_global: hop,
                        next_hop_local: None,
                        nlri: Box::new([nlri]),
                    }),
                )
                .ok_or_else(bad)?,
            );
            Ok(BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                attrs,
                vec![],
            )))
        }
    }
}

/// The UPDATE withdrawing the host route of `vip`.
pub fn withdraw(vip: IpAddr) -> Option<BgpMessage> {
    match vip {
        IpAddr::V4(v4) => Some(BgpMessage::Update(BgpUpdateMessage::new(
            vec![v4_nlri(v4)?],
            vec![],
            vec![],
        ))),
        IpAddr::V6(v6) => {
            let unreach = attr(
                true,
                false,
                PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
                    nlri: Box::new([v6_nlri(v6)?]),
                }),
            )?;
            Some(BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                vec![unreach],
                vec![],
            )))
        }
    }
}

/// End-of-RIB markers (RFC 4724) for IPv4 and IPv6 unicast, sent after the initial routes (each
/// only where the peer offered the family).
pub fn end_of_rib() -> [BgpMessage; 2] {
    let v4 = BgpMessage::Update(BgpUpdateMessage::new(vec![], vec![], vec![]));
    let v6 = BgpMessage::Update(BgpUpdateMessage::new(
        vec![],
        attr(
            true,
            false,
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: Box::new([]) }),
        )
        .into_iter()
        .collect::<Vec<_>>(),
        vec![],
    ));
    [v4, v6]
}

fn v4_nlri(a: Ipv4Addr) -> Option<Ipv4UnicastAddress> {
    let net = Ipv4Net::new(a, 32).ok()?;
    Some(Ipv4UnicastAddress::new_no_path_id(
        Ipv4Unicast::from_net(net).ok()?,
    ))
}

fn v6_nlri(a: Ipv6Addr) -> Option<Ipv6UnicastAddress> {
    let net = Ipv6Net::new(a, 128).ok()?;
    Some(Ipv6UnicastAddress::new(
        None,
        Ipv6Unicast::from_net(net).ok()?,
    ))
}

#[cfg(test)]
mod tests;
