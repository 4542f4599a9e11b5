//! The proxy's in-kernel relay: an sk_skb stream verdict program on the sockets of relayed
//! connections. Every chunk a client (or backend) socket receives is redirected out of its peer
//! socket without waking the daemon, and counted (bytes, last arrival) in `RELAY_LINKS`. The
//! daemon still sees FIN and RST (they wake the socket, not this program) and does half-close,
//! idle timeouts and drain resets itself.
//!
//! A socket with no link (being torn down) passes its bytes to its own receive queue, where the
//! daemon reads them: nothing is dropped for lack of a link.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use lb_common::{RELAY_SOCKETS, RelayLink};

/// The relayed sockets, keyed by socket cookie.
#[map(name = "RELAY_SOCKETS")]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(RELAY_SOCKETS, 0);

/// Socket cookie → where its bytes go and what went through.
#[map(name = "RELAY_LINKS")]
static LINKS: HashMap<u64, RelayLink> = HashMap::with_max_entries(RELAY_SOCKETS, 0);

#[stream_verdict]
pub fn relay_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the socket of the skb the program runs on.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(link) = LINKS.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    // SAFETY: `link` points into the map value, valid for the program's run. Only this socket's
    // receive path writes its entry, and the kernel runs that under the socket's lock, so plain
    // stores do not race with each other; the daemon reads the aligned 64-bit words whole.
    let peer = unsafe {
        let bytes = (*link).bytes + u64::from(ctx.len());
        core::ptr::write_volatile(&raw mut (*link).bytes, bytes);
        core::ptr::write_volatile(&raw mut (*link).last_ns, bpf_ktime_get_ns());
        (*link).peer
    };
    // Redirected out of (sent by) the peer socket; SK_PASS on success, SK_DROP if the peer left
    // the map (the connection is ending: the daemon resets it).
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let verdict = SOCKETS.redirect_skb(&ctx, peer, 0) as u32;
    verdict
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
