//! Packet parsing with an explicit bounds check before every access. Nothing here decides what
//! happens to a packet: it reports what the headers say, or which [`Reason`] stopped it.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, Reason};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

/// EtherTypes, in network order as read from the packet.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();

/// IPv4 "more fragments" flag and fragment offset (network order).
const IPV4_FRAG_MASK_BE: u16 = 0x3fffu16.to_be();

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up (`Reason::PassIpv6Ext`).
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads a `T` at `off` (unaligned), if it is inside the packet.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole value lies inside the packet.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// The link layer: its length (with at most one VLAN tag) and the EtherType after it.
pub struct L2 {
    pub len: usize,
    pub ethertype_be: u16,
}

#[inline(always)]
pub fn l2(ctx: &XdpContext) -> Option<L2> {
    let ethertype_be: u16 = load(ctx, 12)?;
    if ethertype_be == ETH_P_8021Q_BE || ethertype_be == ETH_P_8021AD_BE {
        let inner: u16 = load(ctx, ETH_HLEN + 2)?;
        return Some(L2 {
            len: ETH_HLEN + VLAN_HLEN,
            ethertype_be: inner,
        });
    }
    Some(L2 {
        len: ETH_HLEN,
        ethertype_be,
    })
}

/// What an IP header (and IPv6 extension headers) says.
pub struct Ip {
    pub family: u8,
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    /// The upper-layer protocol.
    pub proto: u8,
    /// Offset of the upper-layer header.
    pub l4_off: usize,
    /// A fragment (first or later): its ports cannot be trusted to be there.
    pub fragment: bool,
}

/// Parses an IPv4 header at `off`. The header is copied out with one bounds check and fields are
/// taken from the copy: separate loads let the compiler reuse one check across pointers the
/// verifier tracks apart.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, off: usize) -> Result<Ip, Reason> {
    let hdr: [u32; 5] = load(ctx, off).ok_or(Reason::PassTruncated)?;
    let b = hdr[0].to_ne_bytes();
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if b[0] >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(Reason::PassMalformed);
    }
    let flags_frag = hdr[1].to_ne_bytes();
    let frag_be = u16::from_ne_bytes([flags_frag[2], flags_frag[3]]);
    Ok(Ip {
        family: FAMILY_V4,
        src_be: [hdr[3], 0, 0, 0],
        dst_be: [hdr[4], 0, 0, 0],
        proto: hdr[2].to_ne_bytes()[1],
        l4_off: off + ihl,
        fragment: frag_be & IPV4_FRAG_MASK_BE != 0,
    })
}

#[inline(always)]
pub fn ipv6(ctx: &XdpContext, off: usize) -> Result<Ip, Reason> {
    let hdr: [u32; 10] = load(ctx, off).ok_or(Reason::PassTruncated)?;
    if hdr[0].to_ne_bytes()[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let mut next = hdr[1].to_ne_bytes()[2];
    let mut l4_off = off + IPV6_HLEN;
    let mut fragment = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h: [u8; 2] = load(ctx, l4_off).ok_or(Reason::PassTruncated)?;
                next = h[0];
                l4_off += (usize::from(h[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let h: [u8; 2] = load(ctx, l4_off).ok_or(Reason::PassTruncated)?;
                next = h[0];
                l4_off += 8;
                fragment = true;
            }
            _ => break,
        }
    }
    // Still an extension header after MAX_IPV6_EXT_HEADERS of them: the chain is too long.
    if matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS
    ) {
        return Err(Reason::PassIpv6Ext);
    }
    Ok(Ip {
        family: FAMILY_V6,
        src_be: [hdr[2], hdr[3], hdr[4], hdr[5]],
        dst_be: [hdr[6], hdr[7], hdr[8], hdr[9]],
        proto: next,
        l4_off,
        fragment,
    })
}
