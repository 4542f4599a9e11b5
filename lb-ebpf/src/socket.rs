//! Whether a socket on this host would take a new flow.
//!
//! The data plane outlives the daemon (a restart, an upgrade, a crash keep the program attached),
//! but the daemon's proxy sockets do not: a new flow passed up while nothing listens on the VIP
//! would be answered by the stack with a reset. So the first packet of a flow for this host (a SYN,
//! a new UDP flow) looks up a socket in the kernel's tables first. Established traffic never pays
//! for it.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, PROTO_TCP};

/// Size of `bpf_sock_tuple`'s IPv4 and IPv6 members.
const TUPLE_V4: u32 = 12;
const TUPLE_V6: u32 = 36;

/// The packet's addresses and ports, as it arrived (client → VIP).
pub struct Tuple<'a> {
    pub family: u8,
    pub proto: u8,
    pub src_be: &'a [u32; 4],
    pub dst_be: &'a [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Whether a TCP socket (a listener, or a connection in any state) or a UDP socket on this host
/// matches `t`, in the network namespace of the interface the packet arrived on.
#[inline(always)]
pub fn exists(ctx: &XdpContext, t: &Tuple) -> bool {
    // SAFETY: a plain C struct of integers; all zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if t.family == FAMILY_V4 {
        // SAFETY: writing plain integers into the union member used for IPv4.
        let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        v4.saddr = t.src_be[0];
        v4.daddr = t.dst_be[0];
        v4.sport = t.sport_be;
        v4.dport = t.dport_be;
        TUPLE_V4
    } else {
        // SAFETY: as above, the IPv6 member.
        let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        v6.saddr = *t.src_be;
        v6.daddr = *t.dst_be;
        v6.sport = t.sport_be;
        v6.dport = t.dport_be;
        TUPLE_V6
    };
    #[allow(clippy::cast_sign_loss)]
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: `tuple` lives on this stack frame for the call and `size` is the length of the member
    // filled in; the returned reference, if any, is released below.
    let sk = unsafe {
        if t.proto == PROTO_TCP {
            bpf_skc_lookup_tcp(ctx.as_ptr(), &raw mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &raw mut tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a reference acquired by the lookup above.
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    true
}
