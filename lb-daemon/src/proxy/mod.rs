//! The engine's L4 proxy: terminates the virtual services placed on this engine and connects to
//! their pools' backends from the engine's own address (source NAT), so replies come back here.
//!
//! ```text
//!   Proxy::apply(config) ── pools (Pool + health checker; kept when unchanged)
//!        └── one Service per virtual service placed here
//!              ├── TCP: accept loop (tcp.rs) → per connection: pick, connect, relay (relay.rs)
//!              └── UDP: socket loop (udp.rs) → per client session: its own backend socket
//!   Draining (engine or service): the listener closes; connections go on until the deadline,
//!   then are reset (counted). Every connection is in the ConnTable while it lives.
//! ```

pub mod relay;
pub mod tcp;
pub mod threads;
pub mod udp;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backend::Backend;
pub use crate::backend::SourceAddrs;
use crate::{
    config::{Config, EngineState, PoolConfig, Protocol, VirtualServiceConfig},
    conntable::ConnTable,
    health::{self, HealthHandle},
    pool::Pool,
};
use relay::Progress;
use threads::{ProxyThreads, Tasks};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("virtual_services[{index}] ({name}): cannot listen on {addr}")]
    Listen {
        index: usize,
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("pools[{index}].backends[{backend}].address: {addr} is unreachable from this engine")]
    Unreachable {
        index: usize,
        backend: usize,
        addr: IpAddr,
        source: io::Error,
    },
}

/// Whether a virtual service accepts new connections, and if not, when its connections are reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    Serving,
    Draining { deadline: Instant },
}

/// Timeouts of the proxy (`[proxy]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub idle: Duration,
    pub udp_idle: Duration,
}

/// What a service reads for each new connection (or UDP session), so that a reload reaches
/// services that are already running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub timeouts: Timeouts,
    pub sources: SourceAddrs,
    /// UDP sessions' socket buffers (`proxy.udp_buffer_bytes`).
    pub udp_buffer: usize,
}

/// Counters of one virtual service's proxy on this engine.
#[derive(Debug)]
pub struct ServiceStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Refused at once (reset) because no backend was usable.
    pub refused_no_backend: AtomicU64,
    /// Refused at once (reset) because `max_connections` were open.
    pub refused_limit: AtomicU64,
    /// UDP datagrams of new clients dropped while the service drains (TCP clients are refused by
    /// the closed listener instead).
    pub refused_draining: AtomicU64,
    /// Backend connections that failed (the client was reset).
    pub connect_failures: AtomicU64,
    /// Connections reset at the drain deadline.
    pub drain_resets: AtomicU64,
    /// Connections closed for idleness.
    pub idle_timeouts: AtomicU64,
    /// UDP datagrams the kernel dropped on the VIP socket (its receive buffer full), since the
    /// socket opened (`SO_RXQ_OVFL`).
    pub udp_kernel_drops: AtomicU64,
    /// UDP datagrams of sessions this proxy dropped: the backend socket full or refusing, or
    /// longer than it relays.
    pub udp_dropped: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Time from accepting a client to the backend connection being established (the latency the
    /// proxy adds before relaying), in seconds.
    pub connect_latency: Histogram,
}

impl Default for ServiceStats {
    fn default() -> Self {
        ServiceStats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            refused_no_backend: AtomicU64::new(0),
            refused_limit: AtomicU64::new(0),
            refused_draining: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            drain_resets: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            udp_kernel_drops: AtomicU64::new(0),
            udp_dropped: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            // 50 µs … ~1.6 s.
            connect_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16),
            ),
        }
    }
}

/// One virtual service served by this engine's proxy.
#[derive(Debug)]
pub struct Service {
    pub id: u32,
    pub name: Arc<str>,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pool: RwLock<Arc<Pool>>,
    max_connections: AtomicU32,
    settings: RwLock<Settings>,
    drain: watch::Sender<Drain>,
    /// The end of its current drain has been reported in a heartbeat: until then a retiring
    /// service stays listed (a drain with nothing open ends at once, between two beats).
    drain_reported: AtomicBool,
    pub stats: ServiceStats,
}

impl Service {
    /// A heartbeat has reported the end of this drain.
    pub fn drain_end_reported(&self) {
        self.drain_reported.store(true, Ordering::Relaxed);
    }

    pub fn settings(&self) -> Settings {
        *self
            .settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn pool(&self) -> Arc<Pool> {
        self.pool
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn max_connections(&self) -> u64 {
        u64::from(self.max_connections.load(Ordering::Relaxed))
    }

    pub fn drain_state(&self) -> Drain {
        *self.drain.borrow()
    }

    /// A receiver that sees drain changes (connection tasks wait on it for the deadline).
    pub fn watch_drain(&self) -> watch::Receiver<Drain> {
        self.drain.subscribe()
    }

    /// Adds a finished connection's bytes to the service's and the backend's counters.
    pub fn account_finished(&self, backend: &Backend, progress: &Progress) {
        let (to_backend, to_client) = (
            progress.to_backend.load(Ordering::Relaxed),
            progress.to_client.load(Ordering::Relaxed),
        );
        self.stats
            .bytes_to_backend
            .fetch_add(to_backend, Ordering::Relaxed);
        self.stats
            .bytes_to_client
            .fetch_add(to_client, Ordering::Relaxed);
        backend
            .bytes_to_backend
            .fetch_add(to_backend, Ordering::Relaxed);
        backend
            .bytes_to_client
            .fetch_add(to_client, Ordering::Relaxed);
    }

    /// Counts a connection until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> ServiceGuard {
        self.stats.total.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        ServiceGuard(self.clone())
    }
}

/// Decrements the service's active count when dropped.
#[derive(Debug)]
pub struct ServiceGuard(Arc<Service>);

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when `rx` reports a drain deadline that has passed.
pub async fn drain_deadline(mut rx: watch::Receiver<Drain>) {
    loop {
        let state = *rx.borrow_and_update();
        match state {
            Drain::Draining { deadline } => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline.into()) => return,
                    changed = rx.changed() => if changed.is_err() { std::future::pending::<()>().await },
                }
            }
            Drain::Serving => {
                if rx.changed().await.is_err() {
                    // The service is gone without draining: nothing will ever reset us.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

struct PoolEntry {
    config: PoolConfig,
    pool: Arc<Pool>,
    health: Option<HealthHandle>,
    /// The source addresses its health checker uses.
    sources: SourceAddrs,
}

struct ServiceEntry {
    service: Arc<Service>,
    /// Its listener loops (TCP: one per proxy thread) or socket loop (UDP).
    tasks: Tasks,
}

/// The proxy of this engine: reconciles services and pools with the configuration.
pub struct Proxy {
    conns: Arc<ConnTable>,
    /// Where TCP services accept and relay.
    threads: ProxyThreads,
    pools: HashMap<String, PoolEntry>,
    services: HashMap<(SocketAddr, Protocol), ServiceEntry>,
    /// Services removed from the configuration, draining until their deadline.
    retiring: Vec<ServiceEntry>,
    drain_timeout: Duration,
}

impl Proxy {
    pub fn new(conns: Arc<ConnTable>, threads: ProxyThreads) -> Self {
        Proxy {
            conns,
            threads,
            pools: HashMap::new(),
            services: HashMap::new(),
            retiring: Vec::new(),
            drain_timeout: Duration::from_secs(30),
        }
    }

    pub fn conns(&self) -> &Arc<ConnTable> {
        &self.conns
    }

    /// The services this engine serves now (for metrics).
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services
            .values()
            .chain(&self.retiring)
            .map(|e| e.service.clone())
            .collect()
    }

    /// The pools (for metrics).
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.values().map(|p| p.pool.clone()).collect()
    }

    /// Checks what only the kernel can tell before anything is applied: every backend has a route
    /// from this engine.
    pub fn check(config: &Config) -> Result<(), ProxyError> {
        let sources = SourceAddrs::of(&config.proxy);
        for (index, pool) in config.pools.iter().enumerate() {
            for (backend, b) in pool.backends.iter().enumerate() {
                route_check(b.address, sources.for_peer(b.address)).map_err(|source| {
                    ProxyError::Unreachable {
                        index,
                        backend,
                        addr: b.address,
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Brings the proxy to `config`. New listening sockets are all opened first: if one fails,
    /// nothing changes and the error names the virtual service.
    pub fn apply(&mut self, config: &Config) -> Result<(), ProxyError> {
        Self::check(config)?;
        let self_id = config.daemon.engine_id;
        let engine_draining = config
            .engine(self_id)
            .is_some_and(|e| e.state != EngineState::Active);
        let timeouts = Timeouts {
            connect: Duration::from_millis(u64::from(config.proxy.connect_timeout_ms)),
            idle: Duration::from_secs(u64::from(config.proxy.idle_timeout_s)),
            udp_idle: Duration::from_secs(u64::from(config.proxy.udp_idle_timeout_s)),
        };
        let sources = SourceAddrs::of(&config.proxy);
        let udp_buffer = config.proxy.udp_buffer_bytes as usize;
        self.drain_timeout = Duration::from_secs(u64::from(config.proxy.drain_timeout_s));

        let placed: Vec<(usize, &VirtualServiceConfig)> = config
            .virtual_services
            .iter()
            .enumerate()
            .filter(|(_, vs)| vs.pool.is_some() && vs.engines.iter().any(|m| m.id == self_id))
            .collect();

        let mut opened = self.open_sockets(&placed, engine_draining, udp_buffer)?;
        self.reconcile_pools(config, sources);
        // A service's own drain timeout, also for one that leaves this engine but stays in the
        // configuration (a scale-in): its engine group's.
        let default_timeout = self.drain_timeout;
        let timeout_of = |name: &str| {
            config
                .virtual_services
                .iter()
                .find(|vs| vs.name == name)
                .and_then(|vs| vs.drain_timeout_s)
                .map_or(default_timeout, |s| Duration::from_secs(u64::from(s)))
        };
        let mut services = HashMap::new();
        for (_, vs) in &placed {
            let (key, entry) = self.reconcile_service(
                vs,
                engine_draining,
                &mut opened,
                Settings {
                    timeouts,
                    sources,
                    udp_buffer,
                },
            );
            services.insert(key, entry);
        }
        for (_, entry) in std::mem::replace(&mut self.services, services) {
            info!(vs = %entry.service.name, "removed from this engine: draining");
            Self::start_draining(&entry.service, timeout_of(&entry.service.name));
            self.retiring.push(entry);
        }
        let now = Instant::now();
        self.retiring.retain(|e| {
            let s = &e.service;
            let unreported = !s.drain_reported.load(Ordering::Relaxed)
                && matches!(s.drain_state(), Drain::Draining { deadline } if now < deadline);
            s.stats.active.load(Ordering::Relaxed) > 0 || e.tasks.running() || unreported
        });
        Ok(())
    }

    /// Opens every socket a serving service needs and does not have yet; nothing else changes.
    fn open_sockets(
        &self,
        placed: &[(usize, &VirtualServiceConfig)],
        engine_draining: bool,
        udp_buffer: usize,
    ) -> Result<HashMap<(SocketAddr, Protocol), Socket>, ProxyError> {
        let mut opened = HashMap::new();
        for (index, vs) in placed {
            let key = (SocketAddr::new(vs.vip, vs.port), vs.protocol);
            let serving = !(engine_draining || vs.draining);
            let has_task = self.services.get(&key).is_some_and(|e| e.tasks.running());
            if serving && !has_task {
                let listeners = self.threads.count();
                let socket =
                    Socket::open(key.0, vs.protocol, udp_buffer, listeners).map_err(|source| {
                        ProxyError::Listen {
                            index: *index,
                            name: vs.name.clone(),
                            addr: key.0,
                            source,
                        }
                    })?;
                opened.insert(key, socket);
            }
        }
        Ok(opened)
    }

    /// Pools: unchanged ones keep their backends' state and health checker.
    fn reconcile_pools(&mut self, config: &Config, sources: SourceAddrs) {
        let mut pools = HashMap::new();
        for p in &config.pools {
            let mut entry = match self.pools.remove(&p.name) {
                Some(mut old) if old.config == *p => {
                    if old.sources != sources {
                        // Checks leave from the new source address from now on.
                        old.health = None;
                        old.sources = sources;
                    }
                    old
                }
                // Edited: backends that stay keep their health and counters; the checker restarts
                // from each backend's current state.
                Some(old) => PoolEntry {
                    config: p.clone(),
                    pool: Arc::new(Pool::carry_over(p, &old.pool)),
                    health: None,
                    sources,
                },
                None => PoolEntry {
                    config: p.clone(),
                    pool: Arc::new(Pool::new(p)),
                    health: None,
                    sources,
                },
            };
            if entry.health.is_none() {
                entry.health = p.health_check.clone().map(|h| {
                    health::spawn(p.name.clone(), entry.pool.backends.clone(), h, sources)
                });
            }
            pools.insert(p.name.clone(), entry);
        }
        self.pools = pools;
    }

    /// Updates (or creates) the service of `vs`: pool, limit, drain state; starts serving on a
    /// socket opened for it.
    fn reconcile_service(
        &mut self,
        vs: &VirtualServiceConfig,
        engine_draining: bool,
        opened: &mut HashMap<(SocketAddr, Protocol), Socket>,
        settings: Settings,
    ) -> ((SocketAddr, Protocol), ServiceEntry) {
        let key = (SocketAddr::new(vs.vip, vs.port), vs.protocol);
        let pool = self.pools[vs.pool.as_deref().expect("filtered on pool")]
            .pool
            .clone();
        let mut entry = self.services.remove(&key).unwrap_or_else(|| ServiceEntry {
            service: Arc::new(Service {
                id: vs.id,
                name: vs.name.as_str().into(),
                vip: key.0,
                protocol: vs.protocol,
                pool: RwLock::new(pool.clone()),
                max_connections: AtomicU32::new(vs.max_connections),
                settings: RwLock::new(settings),
                drain: watch::Sender::new(Drain::Serving),
                drain_reported: AtomicBool::new(false),
                stats: ServiceStats::default(),
            }),
            tasks: Tasks::default(),
        });
        let s = &entry.service;
        *s.pool
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pool;
        s.max_connections
            .store(vs.max_connections, Ordering::Relaxed);
        *s.settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
        if engine_draining || vs.draining {
            let timeout = vs
                .drain_timeout_s
                .map_or(self.drain_timeout, |t| Duration::from_secs(u64::from(t)));
            Self::start_draining(s, timeout);
        } else {
            s.drain.send_replace(Drain::Serving);
            if let Some(socket) = opened.remove(&key) {
                entry.tasks = socket.spawn(s.clone(), self.conns.clone(), &self.threads);
                info!(vs = %s.name, addr = %s.vip, protocol = %s.protocol, "serving");
            }
        }
        (key, entry)
    }

    fn start_draining(s: &Service, timeout: Duration) {
        if s.drain_state() == Drain::Serving {
            s.drain_reported.store(false, Ordering::Relaxed);
            let deadline = Instant::now() + timeout;
            s.drain.send_replace(Drain::Draining { deadline });
            info!(vs = %s.name, timeout_s = timeout.as_secs(), active = s.stats.active.load(Ordering::Relaxed), "draining");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for e in self.services.values().chain(&self.retiring) {
            e.tasks.abort();
        }
    }
}

/// The listening sockets opened ahead of the service that will use them.
enum Socket {
    /// One per proxy thread, in one `SO_REUSEPORT` group.
    Tcp(Vec<std::net::TcpListener>),
    Udp(tokio::net::UdpSocket),
}

impl Socket {
    fn open(
        addr: SocketAddr,
        protocol: Protocol,
        udp_buffer: usize,
        listeners: usize,
    ) -> io::Result<Socket> {
        Ok(match protocol {
            Protocol::Tcp => Socket::Tcp(tcp::listen_group(addr, listeners)?),
            Protocol::Udp => Socket::Udp(udp::bind(addr, udp_buffer)?),
        })
    }

    /// TCP: each listener's accept loop on its proxy thread (a listener registers with the
    /// runtime of the thread that serves it). UDP: the socket loop on the daemon's runtime.
    fn spawn(self, s: Arc<Service>, conns: Arc<ConnTable>, threads: &ProxyThreads) -> Tasks {
        match self {
            Socket::Tcp(listeners) => Tasks(threads.spawn_all(listeners.into_iter().map(|l| {
                let (s, conns) = (s.clone(), conns.clone());
                async move {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => tcp::serve(l, s, conns).await,
                        Err(e) => warn!(vs = %s.name, "listener: {e}"),
                    }
                }
            }))),
            Socket::Udp(u) => Tasks(vec![tokio::spawn(udp::serve(u, s, conns))]),
        }
    }
}

/// Whether the kernel has a route to `dst` (from `source` when given): a UDP socket connects
/// without sending anything.
fn route_check(dst: IpAddr, source: Option<IpAddr>) -> io::Result<()> {
    let bind = source.unwrap_or(match dst {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let s = std::net::UdpSocket::bind(SocketAddr::new(bind, 0))?;
    s.connect(SocketAddr::new(dst, 9))
        .inspect_err(|e| warn!(%dst, "route check: {e}"))
}

/// Sets `SO_LINGER` 0 so that closing the socket sends a reset.
pub fn reset_on_close(s: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Engine 1 on lo; the service `web` on 127.0.0.1:`port` when `placed`, its pool one backend
    /// on 127.0.0.1:`backend_port`.
    fn config_to(port: u16, backend_port: u16, placed: bool) -> Config {
        let services = if placed {
            format!(
                r#"
[[virtual_services]]
id = 0
name = "web"
vip = "127.0.0.1"
port = {port}
protocol = "tcp"
primary = 1
pool = "web"
engines = [ {{ id = 1 }} ]
"#
            )
        } else {
            String::new()
        };
        Config::parse(&format!(
            r#"
[daemon]
interface = "lo"
engine_id = 1

[[engines]]
id = 1

[[pools]]
name = "web"
backends = [ {{ address = "127.0.0.1", port = {backend_port} }} ]
{services}"#
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_removed_service_stays_listed_until_a_heartbeat_reported_its_drain_end() {
        let port = free_port();
        let mut proxy = Proxy::new(
            Arc::new(ConnTable::default()),
            ProxyThreads::start(2).unwrap(),
        );
        proxy.apply(&config_to(port, 9, true)).unwrap();
        assert_eq!(proxy.services().len(), 1);
        // Removed with nothing open: its drain has ended at once, but nobody has seen it yet.
        proxy.apply(&config_to(port, 9, false)).unwrap();
        let listed = proxy.services();
        assert_eq!(listed.len(), 1, "still listed for the heartbeat");
        assert!(matches!(listed[0].drain_state(), Drain::Draining { .. }));
        assert_eq!(listed[0].stats.active.load(Ordering::Relaxed), 0);
        // Its listener task ends (it closes the listener on the drain).
        for _ in 0..100 {
            if proxy.retiring.iter().all(|e| !e.tasks.running()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(proxy.retiring.iter().all(|e| !e.tasks.running()));
        proxy.apply(&config_to(port, 9, false)).unwrap();
        assert_eq!(
            proxy.services().len(),
            1,
            "nothing open, no task, not reported"
        );
        listed[0].drain_end_reported();
        proxy.apply(&config_to(port, 9, false)).unwrap();
        assert!(proxy.services().is_empty(), "reported: forgotten");
    }

    /// Sockets listening on 127.0.0.1:`port` (`/proc/net/tcp`, state 0A).
    fn listeners_on(port: u16) -> usize {
        let want = format!("0100007F:{port:04X}");
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
            })
            .count()
    }

    /// A backend on 127.0.0.1 that echoes each connection's first read; its port.
    async fn echo_backend() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = backend.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    let n = c.read(&mut buf).await.unwrap_or(0);
                    let _ = c.write_all(&buf[..n]).await;
                });
            }
        });
        port
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Each proxy thread has its own listener of the service (one `SO_REUSEPORT` group), and
    /// connections the kernel hands to any of them are relayed.
    #[tokio::test]
    async fn a_tcp_service_listens_once_per_proxy_thread_and_every_listener_relays() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let backend_port = echo_backend().await;
        let port = free_port();
        let mut proxy = Proxy::new(
            Arc::new(ConnTable::default()),
            ProxyThreads::start(3).unwrap(),
        );
        proxy.apply(&config_to(port, backend_port, true)).unwrap();
        assert_eq!(listeners_on(port), 3, "one listener per proxy thread");
        // Enough connections from distinct ports that the group's hash reaches every listener
        // (a listener that did not serve would leave its clients unanswered).
        for i in 0..60u8 {
            let mut c = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            .unwrap()
            .unwrap();
            c.write_all(&[i; 4]).await.unwrap();
            let mut got = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("connection {i} unanswered"))
                .unwrap();
            assert_eq!(got, [i; 4]);
        }
        let s = &proxy.services()[0];
        assert_eq!(s.stats.total.load(Ordering::Relaxed), 60);
        drop(proxy);
        // The threads stopped with their runtimes: the listeners are closed.
        for _ in 0..100 {
            if listeners_on(port) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listeners_on(port), 0);
    }

    /// Connections whose handshakes completed before the drain, still in the accept queue when
    /// it begins, are accepted and served (drained like the others), not reset by the listener's
    /// close; the listener then closes.
    #[tokio::test]
    async fn a_drain_accepts_what_waits_in_the_accept_queue_before_closing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let backend_port = echo_backend().await;
        let conns = Arc::new(ConnTable::default());
        let mut proxy = Proxy::new(conns.clone(), ProxyThreads::start(1).unwrap());
        proxy
            .apply(&config_to(free_port(), backend_port, true))
            .unwrap();
        let service = proxy.services()[0].clone();
        // A listener of the service that nobody accepts on yet: its clients wait in its queue.
        let port = free_port();
        let mut group = tcp::listen_group(SocketAddr::from(([127, 0, 0, 1], port)), 1).unwrap();
        let listener = tokio::net::TcpListener::from_std(group.remove(0)).unwrap();
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        Proxy::start_draining(&service, Duration::from_secs(30));
        let served = tokio::spawn(tcp::serve(listener, service.clone(), conns));
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the listener closes")
            .unwrap();
        assert_eq!(listeners_on(port), 0, "closed after the drain began");
        for (i, c) in clients.iter_mut().enumerate() {
            let byte = u8::try_from(i).unwrap();
            c.write_all(&[byte; 4]).await.unwrap();
            let mut got = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("queued connection {i} unanswered"))
                .unwrap_or_else(|e| panic!("queued connection {i}: {e}"));
            assert_eq!(got, [byte; 4]);
        }
        assert_eq!(service.stats.total.load(Ordering::Relaxed), 5);
    }

    /// A port some other socket holds (without `SO_REUSEPORT`) is a clear error naming the
    /// service, and nothing is served.
    #[tokio::test]
    async fn a_port_held_by_another_socket_is_a_listen_error() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut proxy = Proxy::new(
            Arc::new(ConnTable::default()),
            ProxyThreads::start(2).unwrap(),
        );
        let e = proxy.apply(&config_to(port, 9, true)).unwrap_err();
        assert!(
            matches!(&e, ProxyError::Listen { name, .. } if name == "web"),
            "{e:?}"
        );
        assert!(proxy.services().is_empty());
        assert_eq!(listeners_on(port), 1, "only the other socket");
    }

    /// A second daemon on this host (same user, so the kernel would let it join the first one's
    /// `SO_REUSEPORT` group and take a share of its clients) gets a Listen error instead, and the
    /// first daemon's listeners are all that listen.
    #[tokio::test]
    async fn a_port_another_daemon_serves_is_a_listen_error() {
        let port = free_port();
        let mut first = Proxy::new(
            Arc::new(ConnTable::default()),
            ProxyThreads::start(2).unwrap(),
        );
        first.apply(&config_to(port, 9, true)).unwrap();
        let mut second = Proxy::new(
            Arc::new(ConnTable::default()),
            ProxyThreads::start(2).unwrap(),
        );
        let e = second.apply(&config_to(port, 9, true)).unwrap_err();
        assert!(
            matches!(&e, ProxyError::Listen { name, source, .. }
                if name == "web" && source.kind() == io::ErrorKind::AddrInUse),
            "{e:?}"
        );
        assert!(second.services().is_empty());
        assert_eq!(listeners_on(port), 2, "only the first daemon's");
        // Once the first is gone, the port is free again.
        drop(first);
        for _ in 0..100 {
            if listeners_on(port) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        second.apply(&config_to(port, 9, true)).unwrap();
        assert_eq!(listeners_on(port), 2);
    }

    /// A service that leaves this engine but stays placed elsewhere (a scale-in) drains for its own
    /// timeout (its engine group's), not the proxy's default.
    #[tokio::test]
    async fn a_service_leaving_this_engine_drains_for_its_own_timeout() {
        let port = free_port();
        let text = |engines: &str| {
            format!(
                r#"
[daemon]
interface = "lo"
engine_id = 1

[proxy]
drain_timeout_s = 30

[[engines]]
id = 1

[[engines]]
id = 2
mac = "02:00:00:00:00:02"

[[pools]]
name = "web"
backends = [ {{ address = "127.0.0.1", port = 9 }} ]

[[virtual_services]]
id = 0
name = "web"
vip = "127.0.0.1"
port = {port}
protocol = "tcp"
primary = 2
pool = "web"
drain_timeout_s = 600
engines = [ {engines} ]
"#
            )
        };
        let mut proxy = Proxy::new(
            Arc::new(ConnTable::default()),
            ProxyThreads::start(2).unwrap(),
        );
        proxy
            .apply(&Config::parse(&text("{ id = 2 }, { id = 1 }")).unwrap())
            .unwrap();
        let before = Instant::now();
        proxy
            .apply(&Config::parse(&text("{ id = 2 }")).unwrap())
            .unwrap();
        let listed = proxy.services();
        assert_eq!(listed.len(), 1);
        let Drain::Draining { deadline } = listed[0].drain_state() else {
            panic!("not draining: {:?}", listed[0].drain_state());
        };
        let left = deadline.saturating_duration_since(before);
        assert!(
            left >= Duration::from_mins(10) && left < Duration::from_secs(601),
            "{left:?}"
        );
    }
}
