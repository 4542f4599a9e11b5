//! TCP: accept on VIP:port, pick a backend, connect to it from the engine's address, relay.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use super::{
    Drain, Service, Settings, SourceAddrs, Timeouts, drain_deadline,
    relay::{self, Progress, RelayEnd, RelayKind},
    reset_on_close,
};
use crate::{
    backend::Backend,
    config::Protocol,
    conntable::{ConnState, ConnTable, FlowKey},
};

/// Accept queue length (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// The listeners of a service on `addr`, one per proxy thread, in one `SO_REUSEPORT` group, not
/// yet registered with a runtime. A group only this call creates: `addr` is first bound without
/// `SO_REUSEPORT`, which fails while any socket listens there, so a second daemon on this host
/// (same user, so the kernel would let it join) gets `EADDRINUSE` instead of half the connections.
pub fn listen_group(addr: SocketAddr, listeners: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let claim = socket_for(addr)?;
    claim.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                format!("{e}: another socket listens on {addr} (another daemon on this host?)"),
            )
        } else {
            e
        }
    })?;
    drop(claim);
    (0..listeners).map(|_| listen(addr)).collect()
}

/// A TCP socket for `addr` with the options every listener has: nonblocking, `SO_REUSEADDR`,
/// `IP_FREEBIND` (it binds before the VIP is configured on this host).
fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    Ok(socket)
}

/// One listener of the group on `addr`.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket_for(addr)?;
    socket.set_reuse_port(true)?;
    // Accepted connections inherit it: no system call per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Accepts until the service drains, spawning one task per connection. The listener then
/// closes (new clients are refused by the kernel), once the connections whose handshakes
/// completed before are accepted: closing it with them in its accept queue would reset them.
pub async fn serve(listener: TcpListener, s: Arc<Service>, conns: Arc<ConnTable>) {
    let mut drain = s.watch_drain();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.wait_for(|d| matches!(d, Drain::Draining { .. })) => break,
        };
        match accepted {
            Ok((client, peer)) => spawn_connection(client, peer, &s, &conns),
            // Out of file descriptors or memory: back off instead of spinning.
            Err(e) => {
                warn!(vs = %s.name, "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    let queued = accept_queued(&listener, &s, &conns);
    debug!(vs = %s.name, queued, "listener closed (draining)");
}

/// Accepts what waits in `listener`'s accept queue now, without waiting; returns how many.
fn accept_queued(listener: &TcpListener, s: &Arc<Service>, conns: &Arc<ConnTable>) -> usize {
    let mut queued = 0;
    loop {
        // Straight to accept4: the runtime would wait for a readiness event first.
        let Ok((socket, peer)) = socket2::SockRef::from(listener).accept() else {
            return queued;
        };
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        let client = socket
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(socket.into()));
        match client {
            Ok(client) => {
                spawn_connection(client, peer, s, conns);
                queued += 1;
            }
            Err(e) => warn!(vs = %s.name, "accept: {e}"),
        }
    }
}

fn spawn_connection(client: TcpStream, peer: SocketAddr, s: &Arc<Service>, conns: &Arc<ConnTable>) {
    // Read per connection: a reload reaches a running service.
    let Settings {
        timeouts: t,
        sources,
        ..
    } = s.settings();
    tokio::spawn(connection(
        client,
        peer,
        s.clone(),
        conns.clone(),
        t,
        sources,
    ));
}

/// Refuses a client at once: a reset, not a connection left hanging.
fn refuse(client: TcpStream) {
    reset_on_close(&client);
    drop(client);
}

async fn connection(
    mut client: TcpStream,
    peer: SocketAddr,
    s: Arc<Service>,
    conns: Arc<ConnTable>,
    t: Timeouts,
    sources: SourceAddrs,
) {
    let accepted = Instant::now();
    if s.stats.active.load(Ordering::Relaxed) >= s.max_connections() {
        s.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
        return refuse(client);
    }
    let _service = s.open();
    let pool = s.pool();
    let Some(backend) = pool.pick(peer.ip()) else {
        s.stats.refused_no_backend.fetch_add(1, Ordering::Relaxed);
        return refuse(client);
    };
    let progress = Arc::new(Progress::default());
    let key = FlowKey {
        client: peer,
        vip: s.vip,
        protocol: Protocol::Tcp,
    };
    let registration = conns.register(key, s.name.clone(), backend.addr, progress.clone());
    let mut upstream = match connect(&backend, sources, t).await {
        Ok(u) => u,
        Err(e) => {
            backend.connect_failures.fetch_add(1, Ordering::Relaxed);
            s.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            debug!(vs = %s.name, backend = %backend.addr, "connect: {e}");
            return refuse(client);
        }
    };
    s.stats
        .connect_latency
        .observe(accepted.elapsed().as_secs_f64());
    if let Ok(local) = upstream.local_addr() {
        registration.conn.set_engine_side(local);
    }
    registration.conn.set_state(ConnState::Established);
    let _backend = backend.open();
    // The client's is inherited from the listener.
    let _ = upstream.set_nodelay(true);

    let mut drain = s.watch_drain();
    let end = tokio::select! {
        end = relay::relay(RelayKind::default(), &mut client, &mut upstream, t.idle, &progress) => Some(end),
        () = drain_deadline(s.watch_drain()) => None,
        // Mark the connection as draining in the table while it waits for the deadline.
        () = async {
            let _ = drain.wait_for(|d| matches!(d, Drain::Draining { .. })).await;
            registration.conn.set_state(ConnState::Draining);
            std::future::pending::<()>().await;
        } => None,
    };
    s.account_finished(&backend, &progress);
    match end {
        None => {
            s.stats.drain_resets.fetch_add(1, Ordering::Relaxed);
            reset_on_close(&client);
            reset_on_close(&upstream);
        }
        Some(RelayEnd::IdleTimeout) => {
            s.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        Some(_) => {}
    }
}

/// Connects to the backend from the engine's source address for its family (or the kernel's
/// choice), within the connect timeout. `IP_BIND_ADDRESS_NO_PORT` defers the port choice to
/// `connect`, so a fixed source address can still use the whole port range per backend.
async fn connect(backend: &Backend, sources: SourceAddrs, t: Timeouts) -> io::Result<TcpStream> {
    let dst = backend.addr;
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = sources.for_peer(dst.ip()) {
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
        socket.bind(SocketAddr::new(src, 0))?;
    }
    tokio::time::timeout(t.connect, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", t.connect),
            )
        })?
}
