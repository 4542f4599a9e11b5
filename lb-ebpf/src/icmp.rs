//! ICMP "fragmentation needed" and ICMPv6 "packet too big" about a VIP flow: the router sends them
//! to the VIP (the source of the too-big packet), so they reach the primary; they must reach the
//! engine that owns the flow, or path MTU discovery breaks for it. The quoted packet is the
//! engine's reply (VIP → client), so the flow is the quote with its ends swapped.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{FlowV4, FlowV6, PROTO_TCP, PROTO_UDP, Reason, VipKey, hash::flow_hash_v6};

use crate::{
    counters::count,
    forward::{TooBig, to_owner},
    maps::VIP_ADDRS,
    parse::{Ip, ipv4, ipv6, load},
    select::{Mode, owner_v4, owner_v6},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMP and ICMPv6 headers before the quoted packet.
const ICMP_HLEN: usize = 8;

/// Whether `ip`'s destination is a VIP address (any port).
#[inline(always)]
pub fn to_vip_addr(ip: &Ip) -> bool {
    let key = VipKey {
        addr_be: ip.dst_be,
        port_be: 0,
        proto: 0,
        family: ip.family,
    };
    VIP_ADDRS.get_ptr(&key).is_some()
}

#[inline(always)]
fn pass(reason: Reason) -> u32 {
    count(reason);
    XDP_PASS
}

/// An ICMP or ICMPv6 packet (`ip` is its outer header; the caller dispatches by family).
#[inline(always)]
pub fn handle(ctx: &XdpContext, l3_off: usize, ip: &Ip) -> u32 {
    let Some(type_code) = load::<[u8; 2]>(ctx, ip.l4_off) else {
        return pass(if to_vip_addr(ip) {
            Reason::PassIcmp
        } else {
            Reason::PassTruncated
        });
    };
    let (v4, too_big) = if ip.family == lb_common::FAMILY_V4 {
        (true, type_code == [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED])
    } else {
        (false, type_code[0] == ICMPV6_PKT_TOOBIG)
    };
    if !too_big {
        return pass(if to_vip_addr(ip) {
            Reason::PassIcmp
        } else {
            Reason::PassNotVip
        });
    }
    let quote_off = ip.l4_off + ICMP_HLEN;
    let quoted = if v4 {
        ipv4(ctx, quote_off)
    } else {
        ipv6(ctx, quote_off)
    };
    let Ok(q) = quoted else {
        return malformed(ip);
    };
    let Some(ports) = load::<[u16; 2]>(ctx, q.l4_off) else {
        return malformed(ip);
    };
    if q.proto != PROTO_TCP && q.proto != PROTO_UDP {
        return pass(Reason::PassIcmp);
    }
    // The quote is VIP:vport → client:cport; the flow is client → VIP.
    let vip = VipKey {
        addr_be: q.src_be,
        port_be: ports[0],
        proto: q.proto,
        family: q.family,
    };
    let (owner, flow_label) = if v4 {
        let flow = FlowV4::new(q.dst_be[0], q.src_be[0], ports[1], ports[0], q.proto);
        (owner_v4(&flow, &vip, false, false, Mode::LookupOnly), 0)
    } else {
        let flow = FlowV6::new(q.dst_be, q.src_be, ports[1], ports[0], q.proto);
        (
            owner_v6(&flow, &vip, false, false, Mode::LookupOnly),
            flow_hash_v6(&flow),
        )
    };
    match owner {
        Ok(owner) => {
            count(Reason::IcmpSteered);
            // An ICMP error is never answered with another (RFC 1122, 4443).
            to_owner(ctx, l3_off, ip.family, &owner, flow_label, TooBig::Drop)
        }
        Err(reason) => {
            count(reason);
            if reason == Reason::PassNotVip || reason == Reason::PassNotPrimary {
                XDP_PASS
            } else {
                XDP_DROP
            }
        }
    }
}

#[inline(always)]
fn malformed(ip: &Ip) -> u32 {
    if to_vip_addr(ip) {
        count(Reason::DropIcmpMalformed);
        return XDP_DROP;
    }
    pass(Reason::PassNotVip)
}
