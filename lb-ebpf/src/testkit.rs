//! Programs for the lab and for measuring the data plane; never loaded by the daemon.
//!
//! `xdp_pass`: the lab attaches it to the bridge side of veth pairs, which only accept `XDP_TX` /
//! redirected frames when their peer runs an XDP program.
//!
//! `tunnel_decap`: a tc ingress program for tunnel-mode engines in the lab, whose kernel has no
//! `ipip` / `ip6_tunnel` device: it strips the outer IPv4 (protocol 4) or IPv6 (next header 41)
//! header so that the stack sees the client's packet to the VIP.
//!
//! Benchmarks (`BPF_PROG_TEST_RUN`):
//! With `repeat N` the kernel runs every iteration on the same buffer, so a path that changes what
//! it later reads sees its own output from the second iteration on. `bench_wrap` restores the input
//! before each iteration and tail-calls the program under test (slot 0 of `BENCH_TARGET`):
//! - `MODE_NEW_FLOW`: writes a fresh source port and address byte, so every iteration is a new flow;
//! - `MODE_STRIP_IPIP`: removes the IP-in-IP header the previous iteration added.
//!
//! Its own cost is measured by tail-calling `xdp_floor` through it, and subtracted.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_ABORTED, XDP_PASS, XDP_TX},
    },
    helpers::bpf_xdp_adjust_head,
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};

const MODE_NEW_FLOW: u32 = 1;
const MODE_STRIP_IPIP: u32 = 2;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;

#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static BENCH_MODE: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if ctx.data() + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((ctx.data() + off) as *mut T)
}

/// Strips an IP-in-IP / IPv6-in-IPv6 outer header (see the module comment).
#[classifier]
pub fn tunnel_decap(ctx: TcContext) -> i32 {
    const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
    const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
    let outer = match ctx.load::<u16>(12) {
        Ok(ETH_P_IP_BE) if ctx.load::<u8>(ETH_HLEN + 9) == Ok(4) => IPV4_HLEN,
        Ok(ETH_P_IPV6_BE) if ctx.load::<u8>(ETH_HLEN + 6) == Ok(41) => 40,
        _ => return TC_ACT_OK as i32,
    };
    let _ = ctx.adjust_room(-(outer as i32), BPF_ADJ_ROOM_MAC, 0);
    TC_ACT_OK as i32
}

/// Passes everything (see the module comment).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The floor: swap the MACs and send the frame back, the least an XDP forwarder does.
#[xdp]
pub fn xdp_floor(ctx: XdpContext) -> u32 {
    let Some(p) = ptr_at::<[u16; 6]>(&ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: checked in bounds.
    unsafe {
        let m = p.read_unaligned();
        p.write_unaligned([m[3], m[4], m[5], m[0], m[1], m[2]]);
    }
    XDP_TX
}

/// Restores the input (see the module comment), then tail-calls the program under test.
/// Expects an untagged IPv4 frame whose IP header has no options.
#[xdp]
pub fn bench_wrap(ctx: XdpContext) -> u32 {
    let mode = BENCH_MODE.get(0).copied().unwrap_or(0);
    if mode & MODE_STRIP_IPIP != 0 {
        if let Some(p) = ptr_at::<[u8; ETH_HLEN + IPV4_HLEN]>(&ctx, 0) {
            // SAFETY: checked in bounds.
            let hdr = unsafe { p.read_unaligned() };
            if hdr[12] == 0x08 && hdr[13] == 0x00 && hdr[ETH_HLEN + 9] == 4 {
                // Move the Ethernet header over the outer IP header, then drop the first 20 bytes.
                if let Some(dst) = ptr_at::<[u8; ETH_HLEN]>(&ctx, IPV4_HLEN) {
                    let mut eth = [0u8; ETH_HLEN];
                    eth.copy_from_slice(&hdr[..ETH_HLEN]);
                    // SAFETY: checked in bounds.
                    unsafe { dst.write_unaligned(eth) };
                }
                // SAFETY: shrinking the head by a header the packet has.
                if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_HLEN as i32) } != 0 {
                    return XDP_ABORTED;
                }
            }
        }
    }
    if mode & MODE_NEW_FLOW != 0 {
        let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
            return XDP_ABORTED;
        };
        // SAFETY: per-CPU slot.
        let n = unsafe {
            *seq = (*seq).wrapping_add(1);
            *seq
        };
        // Source address's last byte (offset 29) and source port (offset 34): 2^24 distinct flows.
        if let Some(p) = ptr_at::<u8>(&ctx, ETH_HLEN + 15) {
            // SAFETY: checked in bounds.
            unsafe { p.write((n >> 16) as u8) };
        }
        if let Some(p) = ptr_at::<u16>(&ctx, ETH_HLEN + IPV4_HLEN) {
            // SAFETY: checked in bounds.
            unsafe { p.write_unaligned((n as u16).to_be()) };
        }
    }
    // SAFETY: a tail call either does not return or fails; failure falls through.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
