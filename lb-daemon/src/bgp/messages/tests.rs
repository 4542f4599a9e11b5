use bytes::BytesMut;
use netgauze_bgp_pkt::{codec::BgpCodec, path_attribute::PathAttributeValue as V};
use tokio_util::codec::{Decoder, Encoder};

use super::*;

const ROUTER_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
const HOP_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const HOP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x53);

/// Encodes `msg` as the speaker does, then decodes the bytes as a peer would: the message the
/// peer sees.
#[track_caller]
fn round_trip(msg: BgpMessage) -> BgpMessage {
    let mut buf = BytesMut::new();
    BgpCodec::new(true)
        .encode(msg, &mut buf)
        .expect("the message encodes");
    let len = buf.len();
    let (decoded, _) = BgpCodec::new(true)
        .decode(&mut buf)
        .expect("the bytes decode")
        .expect("the message is complete");
    assert!(buf.is_empty(), "{} of {len} bytes left over", buf.len());
    decoded
}

#[track_caller]
fn decoded_update(msg: BgpMessage) -> BgpUpdateMessage {
    match round_trip(msg) {
        BgpMessage::Update(u) => u,
        other => panic!("not an UPDATE: {other:?}"),
    }
}

#[track_caller]
fn decoded_open(msg: BgpMessage) -> BgpOpenMessage {
    match round_trip(msg) {
        BgpMessage::Open(o) => o,
        other => panic!("not an OPEN: {other:?}"),
    }
}

/// A standard community `asn:value`.
fn community(asn: u32, value: u32) -> u32 {
    (asn << 16) | value
}

fn v4_host(a: Ipv4Addr) -> Ipv4UnicastAddress {
    Ipv4UnicastAddress::new_no_path_id(Ipv4Unicast::from_net(Ipv4Net::new(a, 32).unwrap()).unwrap())
}

fn v6_host(a: Ipv6Addr) -> Ipv6UnicastAddress {
    Ipv6UnicastAddress::new(
        None,
        Ipv6Unicast::from_net(Ipv6Net::new(a, 128).unwrap()).unwrap(),
    )
}

/// The value of the one attribute `pick` selects; `None` when there is none, a panic when there
/// are several.
#[track_caller]
fn only<'a, T>(u: &'a BgpUpdateMessage, pick: impl Fn(&'a V) -> Option<T>) -> Option<T> {
    let mut found: Vec<T> = u
        .path_attributes()
        .iter()
        .filter_map(|a| pick(a.value()))
        .collect();
    assert!(found.len() <= 1, "attribute repeated in {u:?}");
    found.pop()
}

fn origin(v: &V) -> Option<Origin> {
    if let V::Origin(o) = v { Some(*o) } else { None }
}
fn as_path(v: &V) -> Option<&AsPath> {
    if let V::AsPath(p) = v { Some(p) } else { None }
}
fn next_hop(v: &V) -> Option<Ipv4Addr> {
    if let V::NextHop(h) = v {
        Some(h.next_hop())
    } else {
        None
    }
}
fn med(v: &V) -> Option<u32> {
    if let V::MultiExitDiscriminator(m) = v {
        Some(m.metric())
    } else {
        None
    }
}
fn local_pref(v: &V) -> Option<u32> {
    if let V::LocalPreference(p) = v {
        Some(p.metric())
    } else {
        None
    }
}
fn communities(v: &V) -> Option<Vec<u32>> {
    if let V::Communities(c) = v {
        Some(c.communities().iter().map(Community::value).collect())
    } else {
        None
    }
}
fn mp_reach(v: &V) -> Option<&MpReach> {
    if let V::MpReach(r) = v { Some(r) } else { None }
}
fn mp_unreach(v: &V) -> Option<&MpUnreach> {
    if let V::MpUnreach(r) = v {
        Some(r)
    } else {
        None
    }
}

// ---- OPEN ----

fn capabilities(o: &BgpOpenMessage) -> (Vec<u32>, Vec<AddressType>) {
    let caps = o.capabilities();
    let asn4 = caps
        .iter()
        .filter_map(|c| match c {
            BgpCapability::FourOctetAs(a) => Some(a.asn4()),
            _ => None,
        })
        .collect();
    let families = caps
        .iter()
        .filter_map(|c| match c {
            BgpCapability::MultiProtocolExtensions(m) => Some(m.address_type()),
            _ => None,
        })
        .collect();
    (asn4, families)
}

#[test]
fn open_round_trips_with_4_octet_as_and_both_unicast_families() {
    let o = decoded_open(open(65001, 90, ROUTER_ID));
    assert_eq!(o.version(), 4);
    assert_eq!(o.my_as(), 65001);
    assert_eq!(o.hold_time(), 90);
    assert_eq!(o.bgp_id(), ROUTER_ID);
    assert_eq!(o.my_asn4(), 65001);
    let (asn4, families) = capabilities(&o);
    assert_eq!(asn4, [65001]);
    assert!(families.contains(&AddressType::Ipv4Unicast), "{families:?}");
    assert!(families.contains(&AddressType::Ipv6Unicast), "{families:?}");
    assert_eq!(families.len(), 2, "{families:?}");
}

#[test]
fn open_with_a_4_octet_asn_puts_as_trans_in_my_as() {
    let o = decoded_open(open(4_200_000_001, 0, ROUTER_ID));
    assert_eq!(o.my_as(), AS_TRANS);
    assert_eq!(o.my_as(), 23456);
    assert_eq!(o.my_asn4(), 4_200_000_001);
    assert_eq!(capabilities(&o).0, [4_200_000_001]);
    assert_eq!(o.hold_time(), 0);
    // 65535 still fits the 2-octet field.
    assert_eq!(decoded_open(open(65535, 90, ROUTER_ID)).my_as(), 65535);
    assert_eq!(decoded_open(open(65536, 90, ROUTER_ID)).my_as(), AS_TRANS);
}

// ---- check_open ----

/// A peer's OPEN as `BgpOpenMessage::new` builds it, with the 4-octet AS capability.
fn peer_open(asn: u32, hold: u16, id: Ipv4Addr) -> BgpOpenMessage {
    BgpOpenMessage::new(
        u16::try_from(asn).unwrap_or(AS_TRANS),
        hold,
        id,
        vec![BgpOpenMessageParameter::new_capabilities(vec![
            BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
                AddressType::Ipv4Unicast,
            )),
            BgpCapability::FourOctetAs(FourOctetAsCapability::new(asn)),
        ])],
    )
}

#[track_caller]
fn refused_with(open: &BgpOpenMessage, peer_asn: u32, local_hold: u16) -> OpenMessageError {
    let r = check_open(open, peer_asn, ROUTER_ID, local_hold).expect_err("the OPEN is refused");
    assert!(!r.reason.is_empty());
    match r.notification {
        BgpNotificationMessage::OpenMessageError(e) => e,
        other => panic!("not an OPEN message error: {other:?}"),
    }
}

#[test]
fn a_good_open_is_accepted_with_the_smaller_hold_time() {
    let n = check_open(&peer_open(65002, 30, PEER_ID), 65002, ROUTER_ID, 90).unwrap();
    assert_eq!(
        n,
        Negotiated {
            hold_time: 30,
            peer_id: PEER_ID
        }
    );
    let n = check_open(&peer_open(65002, 180, PEER_ID), 65002, ROUTER_ID, 90).unwrap();
    assert_eq!(n.hold_time, 90);
    let n = check_open(&peer_open(65002, 3, PEER_ID), 65002, ROUTER_ID, 90).unwrap();
    assert_eq!(n.hold_time, 3);
}

#[test]
fn a_zero_hold_time_on_either_side_turns_keepalives_off() {
    let n = check_open(&peer_open(65002, 0, PEER_ID), 65002, ROUTER_ID, 90).unwrap();
    assert_eq!(n.hold_time, 0);
    let n = check_open(&peer_open(65002, 90, PEER_ID), 65002, ROUTER_ID, 0).unwrap();
    assert_eq!(n.hold_time, 0);
}

#[test]
fn a_4_octet_peer_asn_is_read_from_the_capability() {
    let o = peer_open(4_200_000_002, 90, PEER_ID);
    assert_eq!(o.my_as(), AS_TRANS);
    let n = check_open(&o, 4_200_000_002, ROUTER_ID, 90).unwrap();
    assert_eq!(n.peer_id, PEER_ID);
    // The 2-octet field is AS_TRANS, not the configured AS.
    let e = refused_with(&o, u32::from(AS_TRANS), 90);
    assert!(matches!(e, OpenMessageError::BadPeerAs { .. }), "{e:?}");
}

#[test]
fn an_open_from_another_as_is_refused_with_bad_peer_as() {
    let e = refused_with(&peer_open(65003, 90, PEER_ID), 65002, 90);
    assert!(matches!(e, OpenMessageError::BadPeerAs { .. }), "{e:?}");
    let e = refused_with(&peer_open(4_200_000_003, 90, PEER_ID), 4_200_000_002, 90);
    assert!(matches!(e, OpenMessageError::BadPeerAs { .. }), "{e:?}");
}

#[test]
fn an_open_without_4_octet_as_is_refused_with_unsupported_capability() {
    let o = BgpOpenMessage::new(
        65002,
        90,
        PEER_ID,
        vec![BgpOpenMessageParameter::new_capabilities(vec![
            BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
                AddressType::Ipv4Unicast,
            )),
        ])],
    );
    let e = refused_with(&o, 65002, 90);
    let OpenMessageError::UnsupportedCapability { value } = e else {
        panic!("not UnsupportedCapability: {e:?}");
    };
    // Capability 65 (4-octet AS), length 4 (RFC 5492 6).
    assert_eq!(value[..2], [65, 4]);
    let bare = BgpOpenMessage::new(65002, 90, PEER_ID, vec![]);
    let e = refused_with(&bare, 65002, 90);
    assert!(
        matches!(e, OpenMessageError::UnsupportedCapability { .. }),
        "{e:?}"
    );
}

#[test]
fn a_hold_time_of_1_or_2_is_refused() {
    for hold in [1, 2] {
        let e = refused_with(&peer_open(65002, hold, PEER_ID), 65002, 90);
        assert!(
            matches!(e, OpenMessageError::UnacceptableHoldTime { .. }),
            "{hold}: {e:?}"
        );
    }
}

#[test]
fn a_zero_or_own_bgp_identifier_is_refused() {
    for id in [Ipv4Addr::UNSPECIFIED, ROUTER_ID] {
        let e = refused_with(&peer_open(65002, 90, id), 65002, 90);
        assert!(
            matches!(e, OpenMessageError::BadBgpIdentifier { .. }),
            "{id}: {e:?}"
        );
    }
}

// ---- announce ----

fn external() -> Attributes {
    Attributes {
        local_asn: 65001,
        peer_asn: 65002,
        communities: vec![],
        next_hop_v4: Some(HOP_V4),
        next_hop_v6: Some(HOP_V6),
    }
}

fn internal() -> Attributes {
    Attributes {
        peer_asn: 65001,
        ..external()
    }
}

fn route(vip: impl Into<IpAddr>, med: Option<u32>, local_pref: Option<u32>) -> Route {
    Route {
        vip: vip.into(),
        med,
        local_pref,
    }
}

#[test]
fn an_ipv4_route_to_an_external_peer() {
    let a = Attributes {
        communities: vec![community(65001, 10), community(65001, 20)],
        ..external()
    };
    let u = decoded_update(announce(&route(VIP_V4, Some(50), Some(200)), &a).unwrap());
    assert_eq!(u.nlri(), [v4_host(VIP_V4)]);
    assert!(u.withdraw_routes().is_empty());
    assert_eq!(only(&u, next_hop), Some(HOP_V4));
    assert_eq!(
        only(&u, as_path),
        Some(&AsPath::As4PathSegments(Box::new([As4PathSegment::new(
            AsPathSegmentType::AsSequence,
            vec![65001],
        )])))
    );
    assert_eq!(only(&u, origin), Some(Origin::IGP));
    assert_eq!(only(&u, med), Some(50));
    assert_eq!(
        only(&u, local_pref),
        None,
        "no LOCAL_PREF to an external peer"
    );
    assert_eq!(
        only(&u, communities),
        Some(vec![community(65001, 10), community(65001, 20)])
    );
    assert_eq!(only(&u, mp_reach), None);
    assert_eq!(u.end_of_rib(), None);
}

#[test]
fn an_external_route_without_med_or_communities_has_neither() {
    let u = decoded_update(announce(&route(VIP_V4, None, None), &external()).unwrap());
    assert_eq!(u.nlri(), [v4_host(VIP_V4)]);
    assert_eq!(only(&u, med), None);
    assert_eq!(only(&u, communities), None);
    assert_eq!(only(&u, local_pref), None);
    assert_eq!(only(&u, origin), Some(Origin::IGP));
    assert_eq!(only(&u, next_hop), Some(HOP_V4));
}

#[test]
fn a_4_octet_local_asn_is_whole_in_the_as_path() {
    let a = Attributes {
        local_asn: 4_200_000_001,
        ..external()
    };
    let u = decoded_update(announce(&route(VIP_V4, None, None), &a).unwrap());
    let path: Vec<u32> = only(&u, as_path).unwrap().clone().into();
    assert_eq!(path, [4_200_000_001]);
}

#[test]
fn a_route_to_an_internal_peer_has_local_pref_and_an_empty_as_path() {
    let u = decoded_update(announce(&route(VIP_V4, Some(50), Some(200)), &internal()).unwrap());
    assert_eq!(u.nlri(), [v4_host(VIP_V4)]);
    assert_eq!(
        only(&u, as_path),
        Some(&AsPath::As4PathSegments(Box::new([])))
    );
    assert_eq!(only(&u, local_pref), Some(200));
    assert_eq!(only(&u, med), None, "no MED to an internal peer");
    assert_eq!(only(&u, origin), Some(Origin::IGP));
    assert_eq!(only(&u, next_hop), Some(HOP_V4));

    let u = decoded_update(announce(&route(VIP_V4, Some(50), None), &internal()).unwrap());
    assert_eq!(only(&u, local_pref), Some(100), "the default LOCAL_PREF");
}

#[test]
fn an_ipv6_route_goes_in_mp_reach() {
    let a = Attributes {
        communities: vec![community(65001, 10)],
        ..external()
    };
    let u = decoded_update(announce(&route(VIP_V6, Some(7), None), &a).unwrap());
    assert!(u.nlri().is_empty(), "no classic NLRI: {u:?}");
    assert!(u.withdraw_routes().is_empty());
    assert_eq!(only(&u, next_hop), None, "no classic NEXT_HOP: {u:?}");
    assert_eq!(
        only(&u, mp_reach),
        Some(&MpReach::Ipv6Unicast {
            next_hop_global: HOP_V6,
            next_hop_local: None,
            nlri: Box::new([v6_host(VIP_V6)]),
        })
    );
    assert_eq!(only(&u, origin), Some(Origin::IGP));
    assert_eq!(only(&u, med), Some(7));
    assert_eq!(only(&u, communities), Some(vec![community(65001, 10)]));
    let path: Vec<u32> = only(&u, as_path).unwrap().clone().into();
    assert_eq!(path, [65001]);
}

#[test]
fn an_ipv6_route_to_an_internal_peer() {
    let u = decoded_update(announce(&route(VIP_V6, Some(7), Some(300)), &internal()).unwrap());
    assert!(u.nlri().is_empty());
    assert_eq!(only(&u, local_pref), Some(300));
    assert_eq!(only(&u, med), None);
    assert_eq!(
        only(&u, as_path),
        Some(&AsPath::As4PathSegments(Box::new([])))
    );
    assert!(matches!(
        only(&u, mp_reach),
        Some(MpReach::Ipv6Unicast { next_hop_global, .. }) if *next_hop_global == HOP_V6
    ));
}

#[test]
fn a_route_without_a_next_hop_of_its_family_is_unannounceable() {
    let no_v4 = Attributes {
        next_hop_v4: None,
        ..external()
    };
    assert_eq!(
        announce(&route(VIP_V4, None, None), &no_v4),
        Err(Unannounceable::NoNextHopV4(VIP_V4.into()))
    );
    assert!(announce(&route(VIP_V6, None, None), &no_v4).is_ok());
    let no_v6 = Attributes {
        next_hop_v6: None,
        ..external()
    };
    assert_eq!(
        announce(&route(VIP_V6, None, None), &no_v6),
        Err(Unannounceable::NoNextHopV6(VIP_V6.into()))
    );
    assert!(announce(&route(VIP_V4, None, None), &no_v6).is_ok());
    let err = Unannounceable::NoNextHopV4(VIP_V4.into()).to_string();
    assert!(
        err.contains("10.100.0.10") && err.contains("next_hop_v4"),
        "{err}"
    );
}

#[test]
fn many_communities_still_encode() {
    // From 64 communities (256 octets) on, the length no longer fits one octet.
    for n in [63, 64, 100] {
        let list: Vec<u32> = (0..n).map(|i| community(65001, i)).collect();
        let a = Attributes {
            communities: list.clone(),
            ..external()
        };
        let u = decoded_update(announce(&route(VIP_V4, None, None), &a).unwrap());
        assert_eq!(only(&u, communities), Some(list), "{n} communities");
        assert_eq!(u.nlri(), [v4_host(VIP_V4)], "{n} communities");
    }
}

// ---- withdraw, End-of-RIB, Cease ----

#[test]
fn an_ipv4_withdraw_lists_the_host_route() {
    let u = decoded_update(withdraw(VIP_V4.into()).unwrap());
    assert_eq!(u.withdraw_routes(), [v4_host(VIP_V4)]);
    assert!(u.nlri().is_empty());
    assert!(u.path_attributes().is_empty(), "{u:?}");
    assert_eq!(u.end_of_rib(), None);
}

#[test]
fn an_ipv6_withdraw_goes_in_mp_unreach() {
    let u = decoded_update(withdraw(VIP_V6.into()).unwrap());
    assert!(u.withdraw_routes().is_empty());
    assert!(u.nlri().is_empty());
    assert_eq!(u.path_attributes().len(), 1, "{u:?}");
    assert_eq!(
        only(&u, mp_unreach),
        Some(&MpUnreach::Ipv6Unicast {
            nlri: Box::new([v6_host(VIP_V6)]),
        })
    );
    assert_eq!(u.end_of_rib(), None);
}

#[test]
fn end_of_rib_marks_both_families() {
    let eor: Vec<BgpUpdateMessage> = end_of_rib().into_iter().map(decoded_update).collect();
    assert_eq!(eor.len(), 2);
    let v4 = &eor[0];
    assert!(v4.withdraw_routes().is_empty() && v4.nlri().is_empty());
    assert!(v4.path_attributes().is_empty(), "{v4:?}");
    assert_eq!(v4.end_of_rib(), Some(AddressType::Ipv4Unicast));
    let v6 = &eor[1];
    assert!(v6.withdraw_routes().is_empty() && v6.nlri().is_empty());
    assert_eq!(v6.path_attributes().len(), 1, "{v6:?}");
    assert_eq!(
        only(v6, mp_unreach),
        Some(&MpUnreach::Ipv6Unicast { nlri: Box::new([]) })
    );
    assert_eq!(v6.end_of_rib(), Some(AddressType::Ipv6Unicast));
}

#[track_caller]
fn shutdown_value(msg: BgpMessage) -> Box<[u8]> {
    match round_trip(msg) {
        BgpMessage::Notification(BgpNotificationMessage::CeaseError(
            CeaseError::AdministrativeShutdown { value },
        )) => value,
        other => panic!("not a Cease administrative shutdown: {other:?}"),
    }
}

#[test]
fn cease_carries_the_shutdown_communication() {
    assert_eq!(&*shutdown_value(cease("x")), [1, b'x']);
    let v = shutdown_value(cease("lb-daemon shutting down"));
    assert_eq!(usize::from(v[0]), "lb-daemon shutting down".len());
    assert_eq!(&v[1..], b"lb-daemon shutting down");
    assert_eq!(&*shutdown_value(cease("")), [0]);
}

#[test]
fn a_long_cease_reason_is_cut_to_128_bytes() {
    let long = "a".repeat(200);
    let v = shutdown_value(cease(&long));
    assert_eq!(v.len(), 129);
    assert_eq!(v[0], 128);
    assert_eq!(&v[1..], &long.as_bytes()[..128]);
    let exact = "b".repeat(128);
    let v = shutdown_value(cease(&exact));
    assert_eq!((v.len(), v[0]), (129, 128));
}

#[test]
fn a_cease_reason_is_cut_on_a_character_boundary() {
    // 127 ASCII bytes, then a 2-byte character that would straddle the 128-byte limit.
    let v = shutdown_value(cease(&format!("{}é", "a".repeat(127))));
    assert_eq!(v[0], 127);
    assert!(std::str::from_utf8(&v[1..]).is_ok());
}
