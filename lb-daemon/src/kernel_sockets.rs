//! The kernel's TCP socket table, asked about one connection at a time (`sock_diag`, an exact
//! lookup by 4-tuple, not a dump).
//!
//! Why the owner queries need it: the proxy's connection table learns a connection when the
//! proxy accepts it, but the kernel holds it from the client's SYN on — half open (`SYN_RECV`),
//! then in the listener's accept queue. A flow that moves between engines in that window (a
//! migration's gratuitous ARP, say, between this engine's SYN-ACK and the client's ACK) must
//! still be claimed by this engine, or the new primary takes it and its stack resets it.
//!
//! A lookup is two system calls and a kernel hash lookup; a storm of unknown segments asks
//! about thousands of flows per second, so lookups are bounded by a [`Budget`] (flows over it
//! are claimed only from the proxy's table).

use std::{io, net::SocketAddr, time::Instant};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SockDiagMessage, TCP_LISTEN,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// Lookups per second at most, and at most this many at once after a quiet spell: the flows that
/// are mid-handshake when a flow changes engines are about the connection rate times a round
/// trip (hundreds at most), far fewer than a storm's.
pub const LOOKUPS_PER_SECOND: u32 = 1000;

/// A token bucket of [`LOOKUPS_PER_SECOND`].
#[derive(Debug)]
pub struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    pub fn new(now: Instant) -> Budget {
        Budget {
            tokens: f64::from(LOOKUPS_PER_SECOND),
            last: now,
        }
    }

    /// Whether a lookup may be made at `now` (and takes it).
    pub fn take(&mut self, now: Instant) -> bool {
        let rate = f64::from(LOOKUPS_PER_SECOND);
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket of this network namespace.
pub struct KernelSockets {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl KernelSockets {
    pub fn open() -> io::Result<KernelSockets> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // The kernel answers an exact lookup while it handles the request: the answer is queued
        // when `send` returns, and a missing one is an error here, never a wait.
        socket.set_non_blocking(true)?;
        Ok(KernelSockets {
            socket,
            seq: 0,
            buf: vec![0; 8192],
        })
    }

    /// Whether a TCP socket of this host connects `local` with `remote`: half open, waiting in a
    /// listener's accept queue, established or closing (a listener on `local` is not one).
    pub fn has_tcp(&mut self, local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
        let family = match (local, remote) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
            _ => return Ok(false),
        };
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: remote.port(),
                    source_address: local.ip(),
                    destination_address: remote.ip(),
                    interface_id: 0,
                    // All ones: no cookie to match.
                    cookie: [0xff; 8],
                },
            })
            .into(),
        );
        request.finalize();
        let mut out = vec![0; request.buffer_len()];
        request.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = usize::try_from(message.header.length).unwrap_or(0);
                if message.header.sequence_number == self.seq {
                    return match message.payload {
                        // The exact lookup falls back to a listener of `local`: not a connection.
                        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                            Ok(r.header.state != TCP_LISTEN
                                && r.header.socket_id.destination_address == remote.ip()
                                && r.header.socket_id.destination_port == remote.port())
                        }
                        NetlinkPayload::Error(e)
                            if e.code.is_none_or(|c| c.get() == -libc::ENOENT) =>
                        {
                            Ok(false)
                        }
                        NetlinkPayload::Error(e) => Err(e.to_io()),
                        _ => Ok(false),
                    };
                }
                // An answer to an earlier request that gave up: skipped.
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };

    use std::time::Duration;

    use super::*;

    /// A connection waiting in the accept queue is found, and still is once accepted; another
    /// client port, the listener itself and a closed-and-reset connection are not.
    fn finds_what_the_kernel_holds(bind: &str) {
        let mut kernel = KernelSockets::open().unwrap();
        let listener = TcpListener::bind(bind).unwrap();
        let local = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(local).unwrap();
        let remote = client.local_addr().unwrap();
        assert!(
            kernel.has_tcp(local, remote).unwrap(),
            "in the accept queue"
        );
        let other = SocketAddr::new(remote.ip(), remote.port().wrapping_add(1));
        assert!(
            !kernel.has_tcp(local, other).unwrap(),
            "another client port"
        );
        let unspecified = SocketAddr::new(remote.ip(), 0);
        assert!(!kernel.has_tcp(local, unspecified).unwrap(), "the listener");

        let (mut accepted, _) = listener.accept().unwrap();
        assert!(kernel.has_tcp(local, remote).unwrap(), "accepted");
        client.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).unwrap();
        // A reset leaves nothing behind (no TIME_WAIT).
        socket2::SockRef::from(&accepted)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(accepted);
        drop(client);
        assert!(!kernel.has_tcp(local, remote).unwrap(), "reset and closed");
    }

    #[test]
    fn finds_ipv4_connections_the_kernel_holds() {
        finds_what_the_kernel_holds("127.0.0.1:0");
    }

    #[test]
    fn finds_ipv6_connections_the_kernel_holds() {
        finds_what_the_kernel_holds("[::1]:0");
    }

    #[test]
    fn the_budget_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let burst = (0..2 * LOOKUPS_PER_SECOND).filter(|_| b.take(t0)).count();
        assert_eq!(burst, LOOKUPS_PER_SECOND as usize);
        // A tenth of a second later, a tenth of the rate.
        let later = t0 + Duration::from_millis(100);
        let then = (0..LOOKUPS_PER_SECOND).filter(|_| b.take(later)).count();
        assert_eq!(then, LOOKUPS_PER_SECOND as usize / 10);
        // Never more than the burst, however long it was quiet.
        let quiet = later + Duration::from_mins(1);
        let after = (0..2 * LOOKUPS_PER_SECOND)
            .filter(|_| b.take(quiet))
            .count();
        assert_eq!(after, LOOKUPS_PER_SECOND as usize);
    }

    #[test]
    fn mixed_families_are_no_connection() {
        let mut kernel = KernelSockets::open().unwrap();
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[::1]:4000".parse().unwrap();
        assert!(!kernel.has_tcp(v4, v6).unwrap());
    }
}
