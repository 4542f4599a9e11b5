//! The XDP steering data plane of a service engine.
//!
//! `lb_xdp` runs on every engine. For a virtual service this engine is primary of, it finds the
//! flow's owner (connection table, persistence, Maglev ring) and passes the packet up (owner is this
//! host), rewrites MACs and transmits it (owner on the segment), or tunnels it (owner routed away).
//! Everything else — not IP, not a VIP, a VIP this engine is secondary of — goes up the stack
//! untouched (a secondary's VIP packets counted against their service). No path aborts: every outcome is a verdict plus a reason counter.
//!
//! Lab and benchmark helper programs live in `lb-xdp-testkit` (`testkit.rs`).
#![no_std]
#![no_main]

mod counters;
mod echo;
mod forward;
mod icmp;
mod maps;
mod parse;
mod select;
mod socket;
mod too_big;
mod tx_errors;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    ENGINE_MODE_LOCAL, ENGINE_MODE_TUNNEL, FAMILY_V4, FlowV4, FlowV6, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, Reason, VS_F_REFUSE_NEW, VipKey, hash::flow_hash_v6,
};

use crate::{
    counters::count,
    parse::{ETH_P_IP_BE, ETH_P_IPV6_BE, load},
    select::{Mode, Owner, owner_v4, owner_v6, place_away_v4, place_away_v6},
    socket::Tuple,
};

/// TCP SYN flag in the flags byte (offset 13 of the TCP header).
const TCP_SYN: u8 = 0x02;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match steer(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            if is_drop(reason) { XDP_DROP } else { XDP_PASS }
        }
    }
}

/// Reasons that end a packet with `XDP_DROP`; every other early exit passes it up.
#[inline(always)]
fn is_drop(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::DropTruncated
            | Reason::DropFragment
            | Reason::DropNoEngine
            | Reason::DropTunnelNoAddr
            | Reason::DropAdjustHead
            | Reason::DropIcmpMalformed
            | Reason::DropRedirect
            | Reason::DropNoListener
            | Reason::DropTooBigNoDf
            | Reason::DropTooBigRateLimited
            | Reason::DropPeerEchoRateLimited
            | Reason::OwnerAsked
    )
}

#[inline(always)]
fn steer(ctx: &XdpContext) -> Result<u32, Reason> {
    let l2 = parse::l2(ctx).ok_or(Reason::PassTruncated)?;
    let ip = if l2.ethertype_be == ETH_P_IP_BE {
        parse::ipv4(ctx, l2.len)?
    } else if l2.ethertype_be == ETH_P_IPV6_BE {
        parse::ipv6(ctx, l2.len)?
    } else {
        return Err(Reason::PassNotIp);
    };
    let v4 = ip.family == FAMILY_V4;
    match ip.proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMP if v4 => return Ok(icmp::handle(ctx, l2.len, &ip)),
        PROTO_ICMPV6 if !v4 => return Ok(icmp::handle(ctx, l2.len, &ip)),
        _ => return Err(Reason::PassNotVip),
    }
    // Later fragments carry no ports and the first one's cannot be matched to them, so fragments
    // to a VIP cannot be steered consistently: they are dropped (engines keep DF set; PMTU works
    // through ICMP steering). Fragments to other addresses pass.
    if ip.fragment {
        return Err(if icmp::to_vip_addr(&ip) {
            Reason::DropFragment
        } else {
            Reason::PassNotVip
        });
    }
    let Some(ports) = load::<[u16; 2]>(ctx, ip.l4_off) else {
        return Err(if icmp::to_vip_addr(&ip) {
            Reason::DropTruncated
        } else {
            Reason::PassTruncated
        });
    };
    if v4 && ip.proto == PROTO_UDP {
        if let Some(verdict) = echo::answer(ctx, l2.len, &ip, ports) {
            return Ok(verdict);
        }
    }
    if !vip_port(ip.proto, ports[1]) {
        return Err(Reason::PassNotVip);
    }
    let vip = VipKey {
        addr_be: ip.dst_be,
        port_be: ports[1],
        proto: ip.proto,
        family: ip.family,
    };
    let (syn, non_syn) = if ip.proto == PROTO_TCP {
        // Cut short: as for the ports above, only a packet to a VIP address is ours to drop.
        let flags: u8 = load(ctx, ip.l4_off + 13).ok_or_else(|| {
            if icmp::to_vip_addr(&ip) {
                Reason::DropTruncated
            } else {
                Reason::PassTruncated
            }
        })?;
        (flags & TCP_SYN != 0, flags & TCP_SYN == 0)
    } else {
        (false, false)
    };
    let tuple = Tuple {
        family: ip.family,
        proto: ip.proto,
        src_be: &ip.src_be,
        dst_be: &ip.dst_be,
        sport_be: ports[0],
        dport_be: ports[1],
    };
    let (owner, flow_label) = if v4 {
        let flow = FlowV4::new(ip.src_be[0], ip.dst_be[0], ports[0], ports[1], ip.proto);
        let found = owner_v4(&flow, &vip, syn, non_syn, Mode::Record);
        let owner = settle(ctx, &tuple, &vip, syn, found, |vs| place_away_v4(&flow, vs));
        (secondary_share(ctx, &vip, syn, owner)?, 0)
    } else {
        let flow = FlowV6::new(ip.src_be, ip.dst_be, ports[0], ports[1], ip.proto);
        let found = owner_v6(&flow, &vip, syn, non_syn, Mode::Record);
        let owner = secondary_share(
            ctx,
            &vip,
            syn,
            settle(ctx, &tuple, &vip, syn, found, |vs| place_away_v6(&flow, vs)),
        )?;
        let label = if owner.engine.mode == ENGINE_MODE_TUNNEL {
            flow_hash_v6(&flow)
        } else {
            0
        };
        (owner, label)
    };
    Ok(forward::to_owner(
        ctx,
        l2.len,
        ip.family,
        &owner,
        flow_label,
        forward::TooBig::Reply,
    ))
}

/// The first packet of a flow for this host (a SYN, a new UDP flow) needs a socket here to take it:
/// the data plane keeps steering while the daemon restarts, and the stack would reset a flow it has
/// no socket for. Without one, a flow this host steers is placed on another engine (`away`); a SYN
/// steered here by the primary is dropped, so that the client retransmits instead of being reset.
/// A draining virtual service (`VS_F_REFUSE_NEW`) closed its listeners on purpose: its new
/// connections go up to be reset at once.
#[inline(always)]
fn settle(
    ctx: &XdpContext,
    t: &Tuple,
    vip: &VipKey,
    syn: bool,
    found: Result<Owner, Reason>,
    away: impl FnOnce(u32) -> Result<Owner, Reason>,
) -> Result<Owner, Reason> {
    match found {
        Ok(owner)
            if owner.engine.mode == ENGINE_MODE_LOCAL
                && (syn || (t.proto == PROTO_UDP && owner.new_flow)) =>
        {
            if refusing(owner.vs_id) || socket::exists(ctx, t) {
                Ok(owner)
            } else {
                away(owner.vs_id)
            }
        }
        Err(Reason::PassNotPrimary) if syn && !vip_refusing(vip) && !socket::exists(ctx, t) => {
            Err(Reason::DropNoListener)
        }
        other => other,
    }
}

/// A packet of a virtual service this engine is a secondary of goes up to its proxy: counted
/// against the service, so that a secondary's heartbeats show its own share of the service (a
/// primary's counters hold all the service's packets, those it steers away included).
#[inline(always)]
fn secondary_share(
    ctx: &XdpContext,
    vip: &VipKey,
    syn: bool,
    owner: Result<Owner, Reason>,
) -> Result<Owner, Reason> {
    if matches!(owner, Err(Reason::PassNotPrimary)) {
        if let Some(id) = maps::VIPS.get_ptr(vip) {
            // SAFETY: a map value pointer from a successful lookup.
            counters::received(unsafe { *id }, (ctx.data_end() - ctx.data()) as u64, syn);
        }
    }
    owner
}

/// Whether virtual service `vs_id` drains: its new connections are refused on purpose.
#[inline(always)]
fn refusing(vs_id: u32) -> bool {
    maps::VS
        .get(vs_id)
        .is_some_and(|vs| vs.flags & VS_F_REFUSE_NEW != 0)
}

/// [`refusing`] for the virtual service of `vip`.
#[inline(always)]
fn vip_refusing(vip: &VipKey) -> bool {
    maps::VIPS.get_ptr(vip).is_some_and(|id| {
        // SAFETY: a map value pointer from a successful lookup.
        refusing(unsafe { *id })
    })
}

/// Whether any VIP uses this (protocol, port): one array read that lets most non-VIP traffic
/// (including replies to the engine's own connections) pass before any hash lookup.
#[inline(always)]
fn vip_port(proto: u8, port_be: u16) -> bool {
    let Some((word, bit)) = lb_common::vip_port_bit(proto, u16::from_be(port_be)) else {
        return false;
    };
    maps::VIP_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
