//! UDP: one socket on VIP:port receives every client's datagrams; each client (address and port)
//! gets a session with its own socket connected to a backend from the engine's address. Replies
//! leave through the VIP socket, so the client sees the VIP as their source. A session ends after
//! `udp_idle_timeout_s` without a datagram either way.
//!
//! At rate: the VIP socket is read in batches (`recvmmsg`, up to [`BATCH`] datagrams per system
//! call); its buffers and the sessions' are `proxy.udp_buffer_bytes` (forced past the system limit
//! where the daemon may); a datagram is handed to its backend socket without waiting, so a backend
//! socket that is full drops (and counts) that datagram instead of stalling every other client of
//! the service; and the kernel's own drops on the VIP socket (its receive buffer overflowing) are
//! read from `SO_RXQ_OVFL` and counted.

use std::{
    collections::HashMap,
    io::{self, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, setsockopt, sockopt,
};
use tokio::{io::Interest, net::UdpSocket, sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use super::{Drain, Service, Settings, SourceAddrs, Timeouts, drain_deadline, relay::Progress};
use crate::{
    backend::ActiveGuard,
    config::Protocol,
    conntable::{ConnState, ConnTable, FlowKey, Registration},
    proxy::ServiceGuard,
};

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// Datagrams read from the VIP socket per system call at most.
pub const BATCH: usize = 16;

/// Sets the receive and send buffers of `sock` to `bytes`: forced past `net.core.rmem_max` /
/// `wmem_max` where the daemon may (`CAP_NET_ADMIN`), else as far as those allow.
pub fn size_buffers(sock: &impl AsFd, bytes: usize) {
    // The kernel takes an int.
    let want = bytes.min(i32::MAX as usize);
    let fd = sock.as_fd();
    if setsockopt(&fd, sockopt::RcvBufForce, &want).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &want);
    }
    if setsockopt(&fd, sockopt::SndBufForce, &want).is_err() {
        let _ = setsockopt(&fd, sockopt::SndBuf, &want);
    }
}

/// The VIP socket. `IP_FREEBIND` lets it bind before the VIP is configured on this host.
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    size_buffers(&socket, buffer_bytes);
    if let Err(e) = setsockopt(&socket, sockopt::RxqOvfl, &1) {
        warn!(%addr, "SO_RXQ_OVFL: {e}: the kernel's drops on this socket are not counted");
    }
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Datagrams of one `recvmmsg`: their lengths and senders, in `bufs`.
struct Batch {
    bufs: Vec<Vec<u8>>,
    got: Vec<(usize, SocketAddr)>,
    /// The socket's drop counter, as the last datagram carrying it said.
    kernel_drops: Option<u32>,
    /// Datagrams longer than [`MAX_DATAGRAM`] (cut: dropped).
    truncated: u64,
}

impl Batch {
    fn new() -> Self {
        Batch {
            bufs: vec![vec![0u8; MAX_DATAGRAM]; BATCH],
            got: Vec::with_capacity(BATCH),
            kernel_drops: None,
            truncated: 0,
        }
    }

    /// Reads what is queued (at most [`BATCH`]); `WouldBlock` when nothing is.
    fn read(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        self.truncated = 0;
        // Made per call: the headers hold raw pointers (not `Send`), and the task is.
        let mut headers =
            MultiHeaders::<SockaddrStorage>::preallocate(BATCH, Some(nix::cmsg_space!(u32)));
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(b.as_mut_slice())])
            .collect();
        let results = recvmmsg(
            sock.as_raw_fd(),
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        for r in results {
            if let Ok(cmsgs) = r.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::RxqOvfl(n) = c {
                        self.kernel_drops = Some(n);
                    }
                }
            }
            let Some(from) = r.address.as_ref().and_then(socket_addr) else {
                continue;
            };
            if r.flags.contains(MsgFlags::MSG_TRUNC) {
                self.truncated += 1;
                continue;
            }
            self.got.push((r.bytes, from));
        }
        Ok(self.got.len())
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
}

struct Session {
    upstream: Arc<UdpSocket>,
    progress: Arc<Progress>,
    task: JoinHandle<()>,
    _registration: Registration,
    _backend: ActiveGuard,
    _service: ServiceGuard,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the VIP socket until the drain deadline passes (then every session ends, counted as
/// drain resets). While draining, datagrams of new clients are dropped and counted.
pub async fn serve(sock: UdpSocket, s: Arc<Service>, conns: Arc<ConnTable>) {
    let sock = Arc::new(sock);
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let deadline = drain_deadline(s.watch_drain());
    tokio::pin!(deadline);
    let mut batch = Batch::new();
    loop {
        tokio::select! {
            r = sock.async_io(Interest::READABLE, || batch.read(&sock)) => {
                if r.is_err() {
                    continue;
                }
                if let Some(n) = batch.kernel_drops {
                    s.stats.udp_kernel_drops.store(u64::from(n), Ordering::Relaxed);
                }
                s.stats.udp_dropped.fetch_add(batch.truncated, Ordering::Relaxed);
                for i in 0..batch.got.len() {
                    let (n, client) = batch.got[i];
                    let datagram = &batch.bufs[i][..n];
                    if let Some(session) = sessions.get(&client) {
                        forward(&s, session, datagram);
                        continue;
                    }
                    // Read per session: a reload reaches a running service.
                    let Settings { timeouts: t, sources, udp_buffer } = s.settings();
                    if let Some(session) = open_session(&s, &conns, client, t, sources, udp_buffer, &sock, &ended_tx).await {
                        forward(&s, &session, datagram);
                        sessions.insert(client, session);
                    }
                }
            }
            Some(client) = ended_rx.recv() => {
                if sessions.remove(&client).is_some() {
                    s.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                }
            }
            () = &mut deadline => {
                s.stats.drain_resets.fetch_add(sessions.len() as u64, Ordering::Relaxed);
                sessions.clear();
                break;
            }
        }
    }
    debug!(vs = %s.name, "UDP socket closed (drained)");
}

/// Hands a client's datagram to its backend socket without waiting: a full socket drops it
/// (counted) rather than stall the other clients. The system call is made directly, not through
/// tokio's readiness (which a new socket has not been seen with yet).
fn forward(s: &Service, session: &Session, datagram: &[u8]) {
    match socket2::SockRef::from(&*session.upstream).send(datagram) {
        Ok(_) => {
            session
                .progress
                .to_backend
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            session.progress.touch();
        }
        // Full (WouldBlock), or refused by the backend's host (an ICMP error queued): dropped.
        Err(_) => {
            s.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_session(
    s: &Arc<Service>,
    conns: &Arc<ConnTable>,
    client: SocketAddr,
    t: Timeouts,
    sources: SourceAddrs,
    buffer_bytes: usize,
    vip_sock: &Arc<UdpSocket>,
    ended: &mpsc::UnboundedSender<SocketAddr>,
) -> Option<Session> {
    if s.drain_state() != Drain::Serving {
        s.stats.refused_draining.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    if s.stats.active.load(Ordering::Relaxed) >= s.max_connections() {
        s.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let service = s.open();
    let Some(backend) = s.pool().pick(client.ip()) else {
        s.stats.refused_no_backend.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let upstream = match connect(backend.addr, sources, buffer_bytes).await {
        Ok(u) => Arc::new(u),
        Err(e) => {
            backend.connect_failures.fetch_add(1, Ordering::Relaxed);
            s.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            debug!(vs = %s.name, backend = %backend.addr, "UDP session: {e}");
            return None;
        }
    };
    let progress = Arc::new(Progress::default());
    let registration = conns.register(
        FlowKey {
            client,
            vip: s.vip,
            protocol: Protocol::Udp,
        },
        s.name.clone(),
        backend.addr,
        progress.clone(),
    );
    if let Ok(local) = upstream.local_addr() {
        registration.conn.set_engine_side(local);
    }
    registration.conn.set_state(ConnState::Established);
    progress.touch();
    let task = tokio::spawn(replies(
        upstream.clone(),
        vip_sock.clone(),
        client,
        progress.clone(),
        t.udp_idle,
        ended.clone(),
        s.clone(),
        backend.clone(),
    ));
    Some(Session {
        upstream,
        progress,
        task,
        _registration: registration,
        _backend: backend.open(),
        _service: service,
    })
}

/// Relays the backend's datagrams to the client until the session has been idle long enough.
#[allow(clippy::too_many_arguments)]
async fn replies(
    upstream: Arc<UdpSocket>,
    vip_sock: Arc<UdpSocket>,
    client: SocketAddr,
    progress: Arc<Progress>,
    idle: Duration,
    ended: mpsc::UnboundedSender<SocketAddr>,
    s: Arc<Service>,
    backend: Arc<crate::backend::Backend>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Some(left) = idle
        .checked_sub(progress.idle_for())
        .filter(|d| !d.is_zero())
    {
        // A receive error (ICMP port unreachable from the backend, ...) keeps the session until idle.
        if let Ok(Ok(n)) = tokio::time::timeout(left, upstream.recv(&mut buf)).await
            && vip_sock.send_to(&buf[..n], client).await.is_ok()
        {
            progress.to_client.fetch_add(n as u64, Ordering::Relaxed);
            progress.touch();
        }
    }
    s.account_finished(&backend, &progress);
    let _ = ended.send(client);
}

/// A socket from the engine's source address (or the kernel's choice) connected to `dst`.
async fn connect(
    dst: SocketAddr,
    sources: SourceAddrs,
    buffer_bytes: usize,
) -> io::Result<UdpSocket> {
    let unspecified: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let bind = sources
        .for_peer(dst.ip())
        .map_or(unspecified, |ip| SocketAddr::new(ip, 0));
    let sock = UdpSocket::bind(bind).await?;
    size_buffers(&sock, buffer_bytes);
    sock.connect(dst).await?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(buffer: usize) -> (UdpSocket, SocketAddr) {
        let sock = bind("127.0.0.1:0".parse().unwrap(), buffer).unwrap();
        let addr = sock.local_addr().unwrap();
        (sock, addr)
    }

    /// Everything queued, read `BATCH` at a time.
    async fn drain(sock: &UdpSocket, batch: &mut Batch, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut out = Vec::new();
        while out.len() < want {
            let n = tokio::time::timeout(
                Duration::from_secs(2),
                sock.async_io(Interest::READABLE, || batch.read(sock)),
            )
            .await
            .expect("datagrams arrive")
            .unwrap();
            assert!(n <= BATCH);
            for (k, (len, from)) in batch.got.iter().enumerate() {
                out.push((batch.bufs[k][..*len].to_vec(), *from));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_batch_reads_many_datagrams_with_their_senders() {
        let (sock, addr) = vip(1 << 20);
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..20u8 {
            a.send_to(&[b'a', i], addr).unwrap();
            b.send_to(&[b'b', i, i], addr).unwrap();
        }
        let mut batch = Batch::new();
        let got = drain(&sock, &mut batch, 40).await;
        assert!(batch.got.len() > 1, "more than one per call");
        assert_eq!(got.len(), 40);
        let from_a: Vec<&Vec<u8>> = got
            .iter()
            .filter(|(_, f)| *f == a.local_addr().unwrap())
            .map(|(d, _)| d)
            .collect();
        let from_b: Vec<&Vec<u8>> = got
            .iter()
            .filter(|(_, f)| *f == b.local_addr().unwrap())
            .map(|(d, _)| d)
            .collect();
        assert_eq!(from_a.len(), 20);
        assert_eq!(from_b.len(), 20);
        for (i, d) in from_a.iter().enumerate() {
            assert_eq!(**d, [b'a', u8::try_from(i).unwrap()], "in order, intact");
        }
        for (i, d) in from_b.iter().enumerate() {
            let i = u8::try_from(i).unwrap();
            assert_eq!(**d, [b'b', i, i]);
        }
        assert_eq!(
            batch.kernel_drops, None,
            "nothing dropped: the kernel attaches no counter"
        );
    }

    #[tokio::test]
    async fn an_ipv6_sender_is_read_too() {
        let Ok(sock) = bind("[::1]:0".parse().unwrap(), 1 << 20) else {
            return; // No IPv6 loopback here.
        };
        let addr = sock.local_addr().unwrap();
        let c = std::net::UdpSocket::bind("[::1]:0").unwrap();
        c.send_to(b"six", addr).unwrap();
        let mut batch = Batch::new();
        let got = drain(&sock, &mut batch, 1).await;
        assert_eq!(got, [(b"six".to_vec(), c.local_addr().unwrap())]);
    }

    /// The kernel's drops when the VIP socket's buffer overflows are what `SO_RXQ_OVFL` says.
    #[tokio::test]
    async fn the_kernels_drops_on_the_vip_socket_are_counted() {
        let (sock, addr) = vip(64 << 10);
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let datagram = [7u8; 1000];
        for _ in 0..2000 {
            c.send_to(&datagram, addr).unwrap();
        }
        let mut batch = Batch::new();
        // What was queued before the buffer filled carries no drops; read it all.
        let mut queued = 0;
        while let Ok(n) = batch.read(&sock) {
            assert!(n > 0);
            queued += n;
        }
        assert!(queued > 0 && queued < 2000, "{queued} queued");
        // A datagram queued after the drops carries their count.
        c.send_to(&datagram, addr).unwrap();
        drain(&sock, &mut batch, 1).await;
        let drops = batch.kernel_drops.expect("SO_RXQ_OVFL is on");
        assert!(
            drops > 1000,
            "2000 × 1000 bytes into a ~128 KiB buffer: {drops} dropped"
        );
    }

    #[test]
    fn buffers_are_sized_past_the_system_limit_where_allowed() {
        let want = 8 << 20;
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        size_buffers(&s, want);
        let rcv = nix::sys::socket::getsockopt(&s, sockopt::RcvBuf).unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kernel doubles what it is asked for (bookkeeping).
        if nix::unistd::geteuid().is_root() {
            assert!(rcv >= 2 * want, "forced: {rcv}");
        } else {
            assert!(rcv >= 2 * want.min(max), "{rcv} (rmem_max {max})");
        }
    }
}
