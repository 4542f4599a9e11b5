//! A packet that would not fit the tunnel to its owner once encapsulated: the sender is told the MTU
//! it must use, from this engine, the way a router on the path would (ICMP "fragmentation needed" /
//! ICMPv6 "packet too big"), or the packet is dropped and counted. Nothing is sent into the tunnel
//! to vanish there.
//!
//! The reply is built in place: the head grows by the new IP and ICMP headers, which go in front of
//! the original IP header (the start of the quote), the MACs are swapped, and the tail is cut so the
//! quote is [`QUOTE_V4`] / [`QUOTE_V6`] bytes. It leaves with `XDP_TX` on the interface the packet
//! came in on, rate-limited per CPU.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::{bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, PROTO_ICMP, PROTO_ICMPV6, Reason};

use crate::{
    counters::count,
    maps::TOO_BIG_RATE,
    parse::{ETH_HLEN, IPV4_HLEN, IPV6_HLEN, VLAN_HLEN, load, ptr_at},
};

/// ICMP and ICMPv6 headers.
const ICMP_HLEN: usize = 8;
/// Bytes of the original packet quoted in an ICMP error: its IPv4 header and the start of its
/// payload (the ports, and more), as Katran does.
pub const QUOTE_V4: usize = 56;
/// Bytes quoted in an ICMPv6 error: its IPv6 header and 160 bytes of payload.
pub const QUOTE_V6: usize = 200;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const REPLY_TTL: u8 = 64;
/// IPv4 "don't fragment" (network order).
const IPV4_DF_BE: u16 = 0x4000u16.to_be();
/// The smallest MTU an IPv6 sender may be told (RFC 8200).
const IPV6_MIN_MTU: u32 = 1280;
/// Replies per CPU: one every `TOO_BIG_INTERVAL_NS`, bursts of up to `TOO_BIG_BURST`.
const TOO_BIG_INTERVAL_NS: u64 = 1_000_000;
const TOO_BIG_BURST: u64 = 100;

/// The length of the IP packet at `l3_off` by its header.
#[inline(always)]
pub fn ip_len(ctx: &XdpContext, l3_off: usize, family: u8) -> Option<usize> {
    if family == FAMILY_V4 {
        let tot: u16 = load(ctx, l3_off + 2)?;
        Some(usize::from(u16::from_be(tot)))
    } else {
        let payload: u16 = load(ctx, l3_off + 4)?;
        Some(usize::from(u16::from_be(payload)) + IPV6_HLEN)
    }
}

/// The packet at `l3_off` of `family` is too big for a path of `path_mtu` once `outer_len` bytes of
/// tunnel header are added: reply with the MTU the sender must use, or drop.
#[inline(always)]
pub fn handle(ctx: &XdpContext, l3_off: usize, family: u8, path_mtu: u16, outer_len: usize) -> u32 {
    let mtu = u32::from(path_mtu).saturating_sub(outer_len as u32);
    let result = if family == FAMILY_V4 {
        let Some(frag_be) = load::<u16>(ctx, l3_off + 6) else {
            count(Reason::DropTruncated);
            return XDP_DROP;
        };
        if frag_be & IPV4_DF_BE == 0 {
            // May be fragmented, but fragments to a VIP cannot be steered (see README): dropped.
            count(Reason::DropTooBigNoDf);
            return XDP_DROP;
        }
        if !allowed() {
            count(Reason::DropTooBigRateLimited);
            return XDP_DROP;
        }
        if l3_off == ETH_HLEN {
            reply_v4::<ETH_HLEN>(ctx, mtu)
        } else {
            reply_v4::<{ ETH_HLEN + VLAN_HLEN }>(ctx, mtu)
        }
    } else {
        if !allowed() {
            count(Reason::DropTooBigRateLimited);
            return XDP_DROP;
        }
        let mtu = mtu.max(IPV6_MIN_MTU);
        if l3_off == ETH_HLEN {
            reply_v6::<ETH_HLEN>(ctx, mtu)
        } else {
            reply_v6::<{ ETH_HLEN + VLAN_HLEN }>(ctx, mtu)
        }
    };
    match result {
        Ok(()) => {
            count(Reason::IcmpTooBigSent);
            XDP_TX
        }
        Err(reason) => {
            count(reason);
            XDP_DROP
        }
    }
}

/// The per-CPU rate limit (GCRA: a theoretical arrival time that each reply pushes on by the
/// interval, never more than the burst ahead of now).
#[inline(always)]
fn allowed() -> bool {
    let Some(tat) = TOO_BIG_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU array slot; only this CPU writes it while this program runs.
    let t = unsafe { (*tat).max(now) };
    if t - now > TOO_BIG_BURST * TOO_BIG_INTERVAL_NS {
        return false;
    }
    // SAFETY: as above.
    unsafe { *tat = t + TOO_BIG_INTERVAL_NS };
    true
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Swaps the MACs and keeps the VLAN tag and EtherType, after the head grew by `grown` bytes (the
/// old frame now starts at `grown`).
#[inline(always)]
fn l2_reply<const L3: usize>(ctx: &XdpContext, grown: usize) -> Result<(), Reason> {
    let old: [u8; 12] = load(ctx, grown).ok_or(Reason::DropAdjustHead)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&old[6..]);
    macs[6..].copy_from_slice(&old[..6]);
    let p = ptr_at::<[u8; 12]>(ctx, 0).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(macs) };
    if L3 == ETH_HLEN {
        let ethertype: u16 = load(ctx, grown + 12).ok_or(Reason::DropAdjustHead)?;
        let p = ptr_at::<u16>(ctx, 12).ok_or(Reason::DropAdjustHead)?;
        // SAFETY: checked in bounds.
        unsafe { p.write_unaligned(ethertype) };
    } else {
        let tag: [u16; 3] = load(ctx, grown + 12).ok_or(Reason::DropAdjustHead)?;
        let p = ptr_at::<[u16; 3]>(ctx, 12).ok_or(Reason::DropAdjustHead)?;
        // SAFETY: checked in bounds.
        unsafe { p.write_unaligned(tag) };
    }
    Ok(())
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> Result<(), Reason> {
    let have = ctx.data_end() - ctx.data();
    if have < len {
        return Err(Reason::DropTruncated);
    }
    // SAFETY: `ctx.ctx` is the program's own context; a negative delta shrinks the tail.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((have - len) as i32)) } != 0 {
        return Err(Reason::DropAdjustHead);
    }
    Ok(())
}

/// The checksum of `N` bytes (a multiple of 4) at `off`, added to `seed` (a partial sum).
#[inline(always)]
fn csum<const N: usize>(ctx: &XdpContext, off: usize, seed: u32) -> Result<u64, Reason> {
    let p = ptr_at::<[u32; N]>(ctx, off).ok_or(Reason::DropTruncated)?;
    // SAFETY: the whole region is inside the packet (checked); the helper only reads it.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            p.cast::<u32>(),
            (N * 4) as u32,
            seed,
        )
    };
    if sum < 0 {
        return Err(Reason::DropAdjustHead);
    }
    Ok(sum as u64)
}

/// ICMP "fragmentation needed" (type 3, code 4) with next-hop MTU `mtu`, from the VIP to the client.
#[inline(always)]
fn reply_v4<const L3: usize>(ctx: &XdpContext, mtu: u32) -> Result<(), Reason> {
    let addrs: [u32; 2] = load(ctx, L3 + 12).ok_or(Reason::DropTruncated)?;
    let (client, vip) = (addrs[0], addrs[1]);
    // Nothing read before this call is used through a packet pointer after it.
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    // SAFETY: `ctx.ctx` is the program's own context; a negative delta grows the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return Err(Reason::DropAdjustHead);
    }
    l2_reply::<L3>(ctx, GROW)?;
    truncate(ctx, L3 + GROW + QUOTE_V4)?;
    let tot_len = (IPV4_HLEN + ICMP_HLEN + QUOTE_V4) as u16;
    let mut ip: [u16; 10] = [
        u16::from_ne_bytes([0x45, 0]),
        tot_len.to_be(),
        0,
        0,
        u16::from_ne_bytes([REPLY_TTL, PROTO_ICMP]),
        0,
        vip as u16,
        (vip >> 16) as u16,
        client as u16,
        (client >> 16) as u16,
    ];
    let mut sum = 0u64;
    for w in ip {
        sum += u64::from(w);
    }
    ip[5] = fold(sum);
    let p = ptr_at::<[u16; 10]>(ctx, L3).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(ip) };
    let icmp: [u16; 4] = [
        u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]),
        0,
        0,
        (mtu.min(0xffff) as u16).to_be(),
    ];
    let off = L3 + IPV4_HLEN;
    let p = ptr_at::<[u16; 4]>(ctx, off).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(icmp) };
    let sum = csum::<{ (ICMP_HLEN + QUOTE_V4) / 4 }>(ctx, off, 0)?;
    let p = ptr_at::<u16>(ctx, off + 2).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(fold(sum)) };
    Ok(())
}

/// ICMPv6 "packet too big" (type 2, code 0) with MTU `mtu`, from the VIP to the client.
#[inline(always)]
fn reply_v6<const L3: usize>(ctx: &XdpContext, mtu: u32) -> Result<(), Reason> {
    let addrs: [u32; 8] = load(ctx, L3 + 8).ok_or(Reason::DropTruncated)?;
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    // SAFETY: as in `reply_v4`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return Err(Reason::DropAdjustHead);
    }
    l2_reply::<L3>(ctx, GROW)?;
    truncate(ctx, L3 + GROW + QUOTE_V6)?;
    let payload = (ICMP_HLEN + QUOTE_V6) as u32;
    // Source: the VIP (the packet's destination); destination: the client.
    let ip: [u32; 10] = [
        0x6000_0000u32.to_be(),
        (payload as u16).to_be() as u32
            | (u32::from(PROTO_ICMPV6) << 16)
            | (u32::from(REPLY_TTL) << 24),
        addrs[4],
        addrs[5],
        addrs[6],
        addrs[7],
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3],
    ];
    let p = ptr_at::<[u32; 10]>(ctx, L3).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(ip) };
    let icmp: [u32; 2] = [
        u32::from(u16::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0])),
        mtu.to_be(),
    ];
    let off = L3 + IPV6_HLEN;
    let p = ptr_at::<[u32; 2]>(ctx, off).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(icmp) };
    // The pseudo-header: source, destination, upper-layer length, next header.
    let mut pseudo: [u32; 10] = [
        addrs[4],
        addrs[5],
        addrs[6],
        addrs[7],
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3],
        payload.to_be(),
        u32::from(PROTO_ICMPV6).to_be(),
    ];
    // SAFETY: `pseudo` is 40 bytes on this stack frame; the helper only reads it.
    let seed = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, pseudo.as_mut_ptr(), 40, 0) };
    if seed < 0 {
        return Err(Reason::DropAdjustHead);
    }
    let sum = csum::<{ (ICMP_HLEN + QUOTE_V6) / 4 }>(ctx, off, fold32(seed as u64))?;
    let p = ptr_at::<u16>(ctx, off + 2).ok_or(Reason::DropAdjustHead)?;
    // SAFETY: checked in bounds.
    unsafe { p.write_unaligned(fold(sum)) };
    Ok(())
}

/// A partial sum folded to 32 bits (a seed for the next `bpf_csum_diff`), not complemented.
#[inline(always)]
fn fold32(sum: u64) -> u32 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}
