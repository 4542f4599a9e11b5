//! Data-plane echo: a peer engine's echo probe (UDP to the peer port, `PEER_KIND_ECHO`) is turned
//! around here and sent back with `XDP_TX`, without the daemon. A peer that gets echoes but no
//! daemon replies knows this host's data plane still steers while its daemon is down (crashed,
//! restarting): a primary in that state is not replaced. A host that answers neither is gone.
//!
//! The echo proves only that the data plane runs: the probe's HMAC is not checked here (the sender
//! checks its own probe when it comes back). Echoes are rate-limited per CPU, and go only back to
//! where the probe came from, at the probe's size, and only to probes sent to this engine's own
//! address (`Globals.peer_addr_v4_be`).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{PEER_ECHO_LEN, PEER_KIND_ECHO, PEER_KIND_ECHO_REPLY, PEER_MAGIC, Reason};

use crate::{
    counters::count,
    maps::{GLOBALS, PEER_ECHO_RATE},
    parse::{Ip, load, ptr_at},
};

const UDP_HLEN: usize = 8;
/// Echoes per CPU: one every `ECHO_INTERVAL_NS`, bursts of up to `ECHO_BURST` (probes come every
/// 50–100 ms from each of a few peers).
const ECHO_INTERVAL_NS: u64 = 100_000;
const ECHO_BURST: u64 = 64;

/// `Some(verdict)` if the IPv4 UDP packet (ports `ports`) is an echo probe to this host's peer port.
#[inline(always)]
pub fn answer(ctx: &XdpContext, l2_len: usize, ip: &Ip, ports: [u16; 2]) -> Option<u32> {
    let g = GLOBALS.get(0)?;
    if g.peer_port_be == 0 || ports[1] != g.peer_port_be {
        return None;
    }
    // To this engine's address only: a switch floods frames for a MAC it no longer knows (a gone
    // engine's), and answering those would make the gone engine look alive.
    let dst: u32 = load(ctx, l2_len + 16)?;
    if g.peer_addr_v4_be == 0 || dst != g.peer_addr_v4_be {
        return None;
    }
    let payload = ip.l4_off + UDP_HLEN;
    let udp_len: u16 = load(ctx, ip.l4_off + 4)?;
    if usize::from(u16::from_be(udp_len)) != UDP_HLEN + PEER_ECHO_LEN {
        return None;
    }
    let head: [u8; 5] = load(ctx, payload)?;
    if head[..4] != PEER_MAGIC || head[4] != PEER_KIND_ECHO {
        return None;
    }
    if !allowed() {
        count(Reason::DropPeerEchoRateLimited);
        return Some(XDP_DROP);
    }
    let eth = ptr_at::<[u8; 12]>(ctx, 0)?;
    let addrs = ptr_at::<[u32; 2]>(ctx, l2_len + 12)?;
    let udp = ptr_at::<[u16; 4]>(ctx, ip.l4_off)?;
    let kind = ptr_at::<u8>(ctx, payload + 4)?;
    // SAFETY: each pointer was bounds-checked by `ptr_at`; the packet is ours to rewrite.
    unsafe {
        let e = eth.read_unaligned();
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&e[6..]);
        swapped[6..].copy_from_slice(&e[..6]);
        eth.write_unaligned(swapped);
        // Swapping the addresses and the ports leaves both checksums' sums as they were; the kind
        // byte changes, and an IPv4 UDP checksum of 0 means "none".
        let a = addrs.read_unaligned();
        addrs.write_unaligned([a[1], a[0]]);
        let u = udp.read_unaligned();
        udp.write_unaligned([u[1], u[0], u[2], 0]);
        *kind = PEER_KIND_ECHO_REPLY;
    }
    count(Reason::PeerEchoAnswered);
    Some(XDP_TX)
}

/// GCRA: whether this CPU may answer one more echo now.
#[inline(always)]
fn allowed() -> bool {
    let Some(tat) = PEER_ECHO_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU array slot; only this CPU writes it while this program runs.
    let t = unsafe { (*tat).max(now) };
    if t - now > ECHO_BURST * ECHO_INTERVAL_NS {
        return false;
    }
    // SAFETY: as above.
    unsafe { *tat = t + ECHO_INTERVAL_NS };
    true
}
