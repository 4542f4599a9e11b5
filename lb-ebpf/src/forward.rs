//! Sending a packet to its owner: up the local stack, to another engine on the segment (MAC rewrite,
//! `XDP_TX` or `XDP_REDIRECT`), or through an IP-in-IP / IPv6-in-IPv6 tunnel.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{
    ENGINE_MODE_L2, ENGINE_MODE_LOCAL, Engine, FAMILY_V4, PROTO_IPIP, PROTO_IPV6, Reason,
};

use crate::{
    counters::{count, traffic},
    maps::{DEVMAP, GLOBALS},
    parse::{ETH_HLEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPV4_HLEN, IPV6_HLEN, load, ptr_at},
    select::Owner,
    too_big,
};

const OUTER_TTL: u8 = 64;
/// IPv4 "don't fragment" (network order).
const IPV4_DF_BE: u16 = 0x4000u16.to_be();

/// What to do with a packet too big for the tunnel to its owner.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TooBig {
    /// Tell the sender the MTU to use (ICMP too-big), or drop (IPv4 without DF).
    Reply,
    /// Drop and count: the packet is itself an ICMP error.
    Drop,
}

/// Sends the packet (whose IP header starts at `l3_off`, of `family`) to `owner`, counting it
/// against the owner's virtual service. `flow_label` is the outer IPv6 flow label of tunnelled
/// IPv6 packets (the flow hash, so the path and the receiver's RSS can spread them).
#[inline(always)]
pub fn to_owner(
    ctx: &XdpContext,
    l3_off: usize,
    family: u8,
    owner: &Owner,
    flow_label: u32,
    too_big: TooBig,
) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    traffic(owner.vs_id, owner.engine_id, bytes, owner.new_flow);
    let e = &owner.engine;
    if e.mode == ENGINE_MODE_LOCAL {
        count(Reason::Local);
        return XDP_PASS;
    }
    if e.mode == ENGINE_MODE_L2 {
        if !rewrite_macs(ctx, e) {
            count(Reason::DropTruncated);
            return XDP_DROP;
        }
        return transmit(ctx, owner.engine_id, e, Reason::TxL2);
    }
    let outer_len = if family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    if e.mtu != 0 {
        let Some(len) = too_big::ip_len(ctx, l3_off, family) else {
            count(Reason::DropTruncated);
            return XDP_DROP;
        };
        if len + outer_len > usize::from(e.mtu) {
            if too_big == TooBig::Drop {
                count(Reason::DropTooBigNoDf);
                return XDP_DROP;
            }
            return too_big::handle(ctx, l3_off, family, e.mtu, outer_len);
        }
    }
    let encapsulated = if family == FAMILY_V4 {
        encap_v4(ctx, l3_off, e)
    } else {
        encap_v6(ctx, l3_off, e, flow_label)
    };
    match encapsulated {
        Ok(()) => transmit(ctx, owner.engine_id, e, Reason::TxTunnel),
        Err(reason) => {
            count(reason);
            XDP_DROP
        }
    }
}

/// Out of the interface the packet came in on, or redirected to the engine's interface.
#[inline(always)]
fn transmit(ctx: &XdpContext, engine_id: u32, e: &Engine, tx_reason: Reason) -> u32 {
    if e.ifindex == 0 || e.ifindex as usize == ctx.ingress_ifindex() {
        count(tx_reason);
        return XDP_TX;
    }
    match DEVMAP.redirect(engine_id, u64::from(XDP_DROP)) {
        Ok(action) => {
            count(if tx_reason == Reason::TxL2 {
                Reason::RedirectL2
            } else {
                Reason::TxTunnel
            });
            action
        }
        Err(_) => {
            count(Reason::DropRedirect);
            XDP_DROP
        }
    }
}

/// Destination and source MAC (the first 12 bytes of the frame) from the engine entry, whose
/// `dst_mac` and `src_mac` are laid out in the same order.
#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, e: &Engine) -> bool {
    let Some(p) = ptr_at::<[u32; 3]>(ctx, 0) else {
        return false;
    };
    // SAFETY: `dst_mac` and `src_mac` are 12 contiguous bytes at the start of `Engine` (repr(C)).
    let macs = unsafe { (e as *const Engine).cast::<[u32; 3]>().read_unaligned() };
    // SAFETY: `ptr_at` checked the 12 bytes are in the packet.
    unsafe { p.write_unaligned(macs) };
    true
}

/// Grows the head by `outer_len` and writes a new Ethernet header for `e`, keeping a VLAN tag.
/// Returns the offset of the outer IP header. Nothing read before the helper call is used after
/// it: the old header is still in the packet, `outer_len` bytes further on.
#[inline(always)]
fn push_outer(
    ctx: &XdpContext,
    l3_off: usize,
    outer_len: usize,
    e: &Engine,
    ethertype_be: u16,
) -> Result<usize, Reason> {
    // SAFETY: `ctx.ctx` is the program's own context; a negative delta grows the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(Reason::DropAdjustHead);
    }
    if !rewrite_macs(ctx, e) {
        return Err(Reason::DropAdjustHead);
    }
    let mut off = ETH_HLEN - 2;
    if l3_off > ETH_HLEN {
        let tag: u32 = load(ctx, outer_len + ETH_HLEN - 2).ok_or(Reason::DropAdjustHead)?;
        let p = ptr_at::<u32>(ctx, off).ok_or(Reason::DropAdjustHead)?;
        // SAFETY: checked in bounds.
        unsafe { p.write_unaligned(tag) };
        off += 4;
    }
    let p = ptr_at::<u16>(ctx, off).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(ethertype_be) };
    Ok(off + 2)
}

#[inline(always)]
fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// IP-in-IP: a new IPv4 header to the engine's address, from this host's tunnel source.
#[inline(always)]
fn encap_v4(ctx: &XdpContext, l3_off: usize, e: &Engine) -> Result<(), Reason> {
    let src = GLOBALS.get(0).map_or(0, |g| g.tunnel_src_v4_be);
    if e.addr_v4_be == 0 || src == 0 {
        return Err(Reason::DropTunnelNoAddr);
    }
    let inner: [u16; 4] = load(ctx, l3_off).ok_or(Reason::DropTruncated)?;
    let tos = inner[0] & u16::from_ne_bytes([0, 0xff]);
    let tot_len_be = (u16::from_be(inner[1]).wrapping_add(IPV4_HLEN as u16)).to_be();
    let frag_be = inner[3] & IPV4_DF_BE;
    let mut hdr: [u16; 10] = [
        u16::from_ne_bytes([0x45, 0]) | tos, // version 4, IHL 5; the inner TOS
        tot_len_be,
        0,
        frag_be,
        u16::from_ne_bytes([OUTER_TTL, PROTO_IPIP]),
        0,
        src as u16,
        (src >> 16) as u16,
        e.addr_v4_be as u16,
        (e.addr_v4_be >> 16) as u16,
    ];
    let mut sum = 0u32;
    for w in hdr {
        sum += u32::from(w);
    }
    hdr[5] = csum_fold(sum);
    let off = push_outer(ctx, l3_off, IPV4_HLEN, e, ETH_P_IP_BE)?;
    let p = ptr_at::<[u16; 10]>(ctx, off).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(hdr) };
    Ok(())
}

/// IPv6-in-IPv6: a new IPv6 header to the engine's address, with `flow_label`.
#[inline(always)]
fn encap_v6(ctx: &XdpContext, l3_off: usize, e: &Engine, flow_label: u32) -> Result<(), Reason> {
    let Some(g) = GLOBALS.get(0) else {
        return Err(Reason::DropTunnelNoAddr);
    };
    let dst = e.addr_v6_be;
    let src = g.tunnel_src_v6_be;
    if dst == [0; 4] || src == [0; 4] {
        return Err(Reason::DropTunnelNoAddr);
    }
    let inner_payload: u16 = load(ctx, l3_off + 4).ok_or(Reason::DropTruncated)?;
    let payload_be = (u16::from_be(inner_payload).wrapping_add(IPV6_HLEN as u16)).to_be();
    let word0 = (0x6000_0000u32 | (flow_label & 0x000f_ffff)).to_be();
    let word1 =
        u32::from(payload_be) | (u32::from(PROTO_IPV6) << 16) | (u32::from(OUTER_TTL) << 24);
    let hdr: [u32; 10] = [
        word0, word1, src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    let off = push_outer(ctx, l3_off, IPV6_HLEN, e, ETH_P_IPV6_BE)?;
    let p = ptr_at::<[u32; 10]>(ctx, off).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(hdr) };
    Ok(())
}
