//! UDP: one socket on VIP:port receives every client's datagrams; each client (address and port)
//! gets a session with its own socket connected to a backend from the engine's address. Replies
//! leave through the VIP socket, so the client sees the VIP as their source. A session ends after
//! `udp_idle_timeout_s` without a datagram either way.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};
use tracing::debug;

use super::{Drain, Service, Settings, SourceAddrs, Timeouts, drain_deadline, relay::Progress};
use crate::{
    backend::ActiveGuard,
    config::Protocol,
    conntable::{ConnState, ConnTable, FlowKey, Registration},
    proxy::ServiceGuard,
};

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// The VIP socket. `IP_FREEBIND` lets it bind before the VIP is configured on this host.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
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
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
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
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                if let Some(session) = sessions.get(&client) {
                    forward(session, &buf[..n]).await;
                    continue;
                }
                // Read per session: a reload reaches a running service.
                let Settings { timeouts: t, sources } = s.settings();
                if let Some(session) = open_session(&s, &conns, client, t, sources, &sock, &ended_tx).await {
                    forward(&session, &buf[..n]).await;
                    sessions.insert(client, session);
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

/// Sends a client's datagram to its backend. Awaited rather than `try_send`: a socket tokio has
/// not yet seen writable would drop a new session's first datagrams.
async fn forward(session: &Session, datagram: &[u8]) {
    if session.upstream.send(datagram).await.is_ok() {
        session
            .progress
            .to_backend
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        session.progress.touch();
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_session(
    s: &Arc<Service>,
    conns: &Arc<ConnTable>,
    client: SocketAddr,
    t: Timeouts,
    sources: SourceAddrs,
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
    let upstream = match connect(backend.addr, sources).await {
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
async fn connect(dst: SocketAddr, sources: SourceAddrs) -> io::Result<UdpSocket> {
    let unspecified: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let bind = sources
        .for_peer(dst.ip())
        .map_or(unspecified, |ip| SocketAddr::new(ip, 0));
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(dst).await?;
    Ok(sock)
}
