//! "Who owns this flow?" — how a new primary learns the flows the surviving engines own, so that
//! their connections never notice the failover.
//!
//! - **Bulk load.** An engine that sees a new primary for a virtual service
//!   (a [`roles::Change::Followed`](crate::roles::Change::Followed) or, the old primary of a
//!   migration, a `Change::Demoted` from [`crate::roles`]) sends it every flow its proxy holds
//!   for that service (`Owned` messages, seq 0). The new primary
//!   writes them into its connection table: most flows hit at once. A list that arrives before
//!   the receiver has taken the role (the old primary may apply a migration first) is kept for
//!   [`EARLY_TTL`] and written when it does.
//! - **Query.** For a flow the primary's table does not know — a TCP segment without SYN, or (for
//!   a while after a promotion) a UDP datagram — the XDP program hands the 5-tuple to this task
//!   (the `OWNER_QUERIES` ring buffer) and drops the packet. The task asks every engine of the
//!   service that is not gone (`Query`; a daemon that missed its probes while its data plane
//!   answers is asked too), each says which of the flows are its own (`Owned`, the query's seq:
//!   in its proxy's table or, TCP, in the kernel's socket table before the proxy accepted it),
//!   and the answer goes into the connection table: the client's retransmission reaches the
//!   owner. Engines that have not answered within [`QUERY_TIMEOUT`] are asked again, up to
//!   [`QUERY_RETRIES`] times: a slow daemon (an overloaded engine, the one a migration leaves)
//!   costs the flow a retransmission or two, not its connection. A TCP flow no engine owns is
//!   given to this engine, whose stack resets it (the connection is lost); a UDP flow no engine
//!   owns goes where the ring places it (the ring as the data plane has it,
//!   [`crate::engine::Rings`]): a new session there.
//!
//! Cost to a surviving flow: at most one retransmission (the dropped segment), no reset. Bounds:
//! the data plane rate-limits queries per CPU and the ring buffer is fixed in size (beyond either,
//! flows are placed by the ring, counted `owner_query_overflow`); this task keeps at most
//! [`MAX_PENDING`] flows waiting and gives each `QUERY_TIMEOUT × (1 + QUERY_RETRIES)` for answers.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use lb_common::{
    ConnEntry, ENGINE_NONE, FAMILY_V4, FlowV4, FlowV6, OwnerQuery,
    hash::{client_hash, flow_hash_v4, flow_hash_v6, ring_slot},
};
use prometheus_client::metrics::histogram::Histogram;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

use crate::{
    config::Protocol,
    conntable::{ConnTable, FlowKey},
    engine::Rings,
    kernel_sockets::{Budget, KernelSockets},
    peers::{Incoming, Kind, MAX_BODY, Sender},
};

/// Flows waiting for answers at most.
pub const MAX_PENDING: usize = 4096;
/// How long the engines have to answer a query.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(100);
/// How many times engines that have not answered are asked again before the flow is given up.
pub const QUERY_RETRIES: u32 = 4;
/// Pushed flows that arrive before this engine has taken the primary role (the old primary of a
/// migration may apply the change first) are kept this long, at most [`EARLY_MAX`] of them, and
/// written when it takes the role.
pub const EARLY_TTL: Duration = Duration::from_secs(10);
pub const EARLY_MAX: usize = 65_536;
const FLOW_LEN: usize = 18;
/// Flows per message.
pub const FLOWS_PER_MESSAGE: usize = (MAX_BODY - 4) / FLOW_LEN;
const _: () = assert!(4 + FLOWS_PER_MESSAGE * FLOW_LEN <= MAX_BODY);

/// A virtual service as the owner queries see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// The other engines of the service that are not gone, with their peer addresses.
    pub peers: Vec<(u32, SocketAddr)>,
    /// This engine steers it.
    pub primary: bool,
    /// The engine that steers it.
    pub primary_id: u32,
    /// Source-IP persistence (0: none), for [`crate::mirror`].
    pub persistence_timeout_s: u32,
}

/// What the task works from (the engine refreshes it on every change of roles or peers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerPlan {
    pub self_id: u32,
    pub services: BTreeMap<u32, Service>,
}

/// Something this task is told to do besides answering.
#[derive(Debug, Clone, Copy)]
pub enum Command {
    /// `primary` is the new primary of `vs_id`: send it the flows held here.
    PushFlows { vs_id: u32, primary: u32 },
}

#[derive(Debug)]
pub struct OwnerCounters {
    pub asked: AtomicU64,
    pub answered: AtomicU64,
    pub unowned: AtomicU64,
    pub unanswered: AtomicU64,
    /// Flows asked about again because an engine had not answered in time.
    pub retried: AtomicU64,
    pub overflow: AtomicU64,
    pub bulk_loaded: AtomicU64,
    pub bulk_sent: AtomicU64,
    pub queries_answered: AtomicU64,
    /// Flows this engine said it holds that only the kernel's socket table knew (half open, or
    /// not accepted by the proxy yet).
    pub kernel_held: AtomicU64,
    /// Flows not in the proxy's table that were not looked up in the kernel's: over the budget.
    pub kernel_over_budget: AtomicU64,
    /// Seconds from a flow's query to its answer.
    pub latency: Histogram,
}

impl Default for OwnerCounters {
    fn default() -> Self {
        OwnerCounters {
            asked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            unowned: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            bulk_loaded: AtomicU64::new(0),
            bulk_sent: AtomicU64::new(0),
            queries_answered: AtomicU64::new(0),
            kernel_held: AtomicU64::new(0),
            kernel_over_budget: AtomicU64::new(0),
            latency: Histogram::new([
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
            ]),
        }
    }
}

/// A flow of a virtual service, by its client (the VIP side is the service's).
pub type Client = SocketAddr;

fn encode_flows(vs_id: u32, flows: &[Client]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + flows.len() * FLOW_LEN);
    b.extend_from_slice(&vs_id.to_be_bytes());
    for c in flows {
        let ip = match c.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        b.extend_from_slice(&ip.octets());
        b.extend_from_slice(&c.port().to_be_bytes());
    }
    b
}

pub fn decode_flows(body: &[u8]) -> Option<(u32, Vec<Client>)> {
    if body.len() < 4 || !(body.len() - 4).is_multiple_of(FLOW_LEN) {
        return None;
    }
    let vs_id = u32::from_be_bytes(body[..4].try_into().ok()?);
    let flows = body[4..]
        .chunks_exact(FLOW_LEN)
        .map(|f| {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&f[..16]).expect("16 bytes"));
            let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            SocketAddr::new(ip, u16::from_be_bytes([f[16], f[17]]))
        })
        .collect();
    Some((vs_id, flows))
}

/// The client side of an owner query record.
fn client_of(q: &OwnerQuery) -> Client {
    let port = u16::from_be(q.sport_be);
    if q.family == FAMILY_V4 {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(q.src_be[0]))), port)
    } else {
        let mut b = [0u8; 16];
        for (i, w) in q.src_be.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port)
    }
}

fn v6_be(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().expect("4 bytes")))
}

/// The engine the data plane's ring gives `client`'s flow to `s` (`ring`: the service's ring as
/// the data plane has it): by client address for a persistent service, else by the flow's hash.
pub fn ring_owner(ring: &[u32], s: &Service, client: Client) -> Option<u32> {
    let client_be = match client.ip() {
        IpAddr::V4(c) => [u32::from(c).to_be(), 0, 0, 0],
        IpAddr::V6(c) => v6_be(c),
    };
    let hash = if s.persistence_timeout_s > 0 {
        client_hash(&client_be)
    } else {
        let (sport, dport, proto) = (
            client.port().to_be(),
            s.vip.port().to_be(),
            s.protocol.number(),
        );
        match s.vip.ip() {
            IpAddr::V4(v) => flow_hash_v4(&FlowV4::new(
                client_be[0],
                u32::from(v).to_be(),
                sport,
                dport,
                proto,
            )),
            IpAddr::V6(v) => flow_hash_v6(&FlowV6::new(client_be, v6_be(v), sport, dport, proto)),
        }
    };
    let id = *ring.get(usize::try_from(ring_slot(hash)).ok()?)?;
    (id != ENGINE_NONE).then_some(id)
}

/// Second handles on the pinned connection tables.
pub struct ConnTables {
    v4: BpfHashMap<MapData, FlowV4, ConnEntry>,
    v6: BpfHashMap<MapData, FlowV6, ConnEntry>,
}

impl ConnTables {
    pub fn open(pin_dir: &Path) -> anyhow::Result<ConnTables> {
        let open = |name: &str| -> anyhow::Result<Map> {
            Ok(Map::LruHashMap(MapData::from_pin(pin_dir.join(name))?))
        };
        Ok(ConnTables {
            v4: BpfHashMap::try_from(open("CONN_V4")?)?,
            v6: BpfHashMap::try_from(open("CONN_V6")?)?,
        })
    }

    /// Records that `client`'s flow to `s` is `owner`'s. Existing entries are left alone (the data
    /// plane recorded the flow since, which is newer than what was asked).
    fn write(&mut self, s: &Service, vs_id: u32, client: Client, owner: u32) -> bool {
        let entry = ConnEntry {
            engine_id: owner,
            vs_id,
        };
        let proto = s.protocol.number();
        let sport = client.port().to_be();
        let dport = s.vip.port().to_be();
        let (ok, existed) = match (client.ip(), s.vip.ip()) {
            (IpAddr::V4(c), IpAddr::V4(v)) => {
                let k = FlowV4::new(
                    u32::from(c).to_be(),
                    u32::from(v).to_be(),
                    sport,
                    dport,
                    proto,
                );
                let existed = self.v4.get(&k, 0).is_ok();
                (existed || self.v4.insert(k, entry, 0).is_ok(), existed)
            }
            (IpAddr::V6(c), IpAddr::V6(v)) => {
                let k = FlowV6::new(v6_be(c), v6_be(v), sport, dport, proto);
                let existed = self.v6.get(&k, 0).is_ok();
                (existed || self.v6.insert(k, entry, 0).is_ok(), existed)
            }
            _ => (false, false),
        };
        ok && !existed
    }
}

struct Pending {
    /// The query that asked about it.
    seq: u64,
    asked: Vec<u32>,
    answered: Vec<u32>,
    owner: Option<u32>,
    /// When it was first asked about, and when last.
    first: Instant,
    since: Instant,
    /// Times it was asked again.
    retries: u32,
}

/// The task's ends.
pub struct Channels {
    pub plan: watch::Receiver<OwnerPlan>,
    pub sender: watch::Receiver<Option<Sender>>,
    pub incoming: mpsc::Receiver<Incoming>,
    pub commands: mpsc::Receiver<Command>,
}

/// Runs until the plan channel closes. `queries`: the data plane's ring buffer.
#[allow(clippy::too_many_lines)]
pub async fn run(
    mut ch: Channels,
    queries: RingBuf<MapData>,
    mut tables: ConnTables,
    conns: Arc<ConnTable>,
    rings: Rings,
    counters: Arc<OwnerCounters>,
) {
    // SAFETY: the ring buffer owns its descriptor, and the `AsyncFd` owns the ring buffer: the
    // descriptor stays open and the same for the `AsyncFd`'s life.
    let registered = unsafe {
        AsyncFd::register_with_interest(QueryRing(queries), tokio::io::Interest::READABLE)
    };
    let mut queries = match registered {
        Ok(q) => q,
        Err(e) => {
            warn!(
                "owner queries: cannot poll the ring buffer ({e}); unknown flows are placed by the ring"
            );
            return;
        }
    };
    let mut kernel = KernelSockets::open()
        .inspect_err(|e| {
            warn!("owner queries: no socket table lookups ({e}); only the proxy's connections are claimed");
        })
        .ok()
        .map(|k| (k, Budget::new(Instant::now())));
    let mut pending: HashMap<(u32, Client), Pending> = HashMap::new();
    let mut in_flight = InFlight::new();
    // The plan as of the last look; cloned again only when it changed.
    let mut plan = ch.plan.borrow().clone();
    let mut early = Early::default();
    let mut batch: BTreeMap<u32, Vec<Client>> = BTreeMap::new();
    let mut sweep = tokio::time::interval(QUERY_TIMEOUT / 4);
    loop {
        tokio::select! {
            changed = ch.plan.changed() => {
                if changed.is_err() { return; }
                plan = ch.plan.borrow().clone();
                for (vs_id, s) in plan.services.iter().filter(|(_, s)| s.primary) {
                    let flows = early.take(*vs_id, Instant::now());
                    if !flows.is_empty() {
                        let n = bulk_load(&mut tables, &counters, s, *vs_id, flows.into_iter());
                        info!(vs_id, flows = n, "flows pushed before this engine took the role, bulk-loaded");
                    }
                }
            }
            guard = queries.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                refresh(&ch.plan, &mut plan);
                while let Some(q) = guard.get_inner_mut().next_query() {
                    let client = client_of(&q);
                    let key = (q.vs_id, client);
                    if pending.contains_key(&key) {
                        continue;
                    }
                    if pending.len() >= MAX_PENDING {
                        counters.overflow.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Some(s) = plan.services.get(&q.vs_id) else { continue };
                    counters.asked.fetch_add(1, Ordering::Relaxed);
                    let mine = holds(&conns, &mut kernel, &counters, s, client);
                    pending.insert(key, Pending {
                        seq: 0,
                        asked: s.peers.iter().map(|(id, _)| *id).collect(),
                        answered: Vec::new(),
                        owner: mine.then_some(plan.self_id),
                        first: Instant::now(),
                        since: Instant::now(),
                        retries: 0,
                    });
                    batch.entry(q.vs_id).or_default().push(client);
                }
                guard.clear_ready();
                let sender = ch.sender.borrow().clone();
                let Some(sender) = sender else { continue };
                for (vs_id, clients) in std::mem::take(&mut batch) {
                    let Some(s) = plan.services.get(&vs_id) else { continue };
                    let peers: Vec<SocketAddr> = s.peers.iter().map(|(_, addr)| *addr).collect();
                    ask(&sender, &mut pending, &mut in_flight, vs_id, &clients, &peers).await;
                    // Flows with nobody to ask (or known here) are decided at once.
                    settle_flows(&mut pending, vs_id, &clients, &plan, &mut tables, &rings, &counters);
                }
            }
            Some(inc) = ch.incoming.recv() => {
                refresh(&ch.plan, &mut plan);
                let m = inc.message;
                let Some((vs_id, flows)) = decode_flows(&m.body) else {
                    debug!(engine = m.from, "owner message with a malformed body");
                    continue;
                };
                let Some(s) = plan.services.get(&vs_id) else { continue };
                match m.kind {
                    Kind::Query => {
                        let owned: Vec<Client> = flows
                            .into_iter()
                            .filter(|c| holds(&conns, &mut kernel, &counters, s, *c))
                            .collect();
                        counters.queries_answered.fetch_add(1, Ordering::Relaxed);
                        let sender = ch.sender.borrow().clone();
                        if let Some(sender) = sender {
                            sender.send(inc.from_addr, Kind::Owned, m.seq, encode_flows(vs_id, &owned)).await;
                        }
                    }
                    // Pushed to a new primary: write what the table does not know yet.
                    Kind::Owned if m.seq == 0 && s.primary => {
                        let n = bulk_load(&mut tables, &counters, s, vs_id, flows.into_iter().map(|c| (m.from, c)));
                        info!(engine = m.from, vs_id, flows = n, "flows bulk-loaded from a surviving engine");
                    }
                    // Pushed before this engine has taken the role: kept for when it does.
                    Kind::Owned if m.seq == 0 => {
                        let dropped = early.hold(vs_id, m.from, flows, Instant::now());
                        if dropped > 0 {
                            debug!(engine = m.from, vs_id, dropped, "too many flows pushed early");
                        }
                    }
                    // An answer: it touches the flows it names and those of its query, no others.
                    Kind::Owned => {
                        let asked = in_flight.answered(&mut pending, vs_id, m.seq, m.from, &flows);
                        settle_flows(&mut pending, vs_id, &flows, &plan, &mut tables, &rings, &counters);
                        settle_flows(&mut pending, vs_id, asked, &plan, &mut tables, &rings, &counters);
                    }
                    _ => {}
                }
            }
            Some(cmd) = ch.commands.recv() => {
                refresh(&ch.plan, &mut plan);
                let Command::PushFlows { vs_id, primary } = cmd;
                let sender = ch.sender.borrow().clone();
                let (Some(s), Some(sender)) = (plan.services.get(&vs_id), sender) else { continue };
                let Some((_, addr)) = s.peers.iter().find(|(id, _)| *id == primary) else { continue };
                let clients = conns.clients_of(s.vip, s.protocol);
                for chunk in clients.chunks(FLOWS_PER_MESSAGE) {
                    sender.send(*addr, Kind::Owned, 0, encode_flows(vs_id, chunk)).await;
                }
                counters.bulk_sent.fetch_add(clients.len() as u64, Ordering::Relaxed);
                info!(vs_id, primary, flows = clients.len(), "flows pushed to the new primary");
            }
            _ = sweep.tick() => {
                early.expire(Instant::now());
                if !pending.is_empty() {
                    refresh(&ch.plan, &mut plan);
                    let again = settle(&mut pending, &plan, &mut tables, &rings, &counters);
                    let sender = ch.sender.borrow().clone();
                    if let Some(sender) = sender {
                        for ((vs_id, peers), clients) in again {
                            ask(&sender, &mut pending, &mut in_flight, vs_id, &clients, &peers).await;
                        }
                    }
                }
                in_flight.forget_settled(&pending);
            }
        }
    }
}

/// Flows pushed before this engine took the primary role: service → (when, owner, flow), at most
/// [`EARLY_MAX`] in all, each for [`EARLY_TTL`].
#[derive(Debug, Default)]
struct Early(HashMap<u32, Vec<(Instant, u32, Client)>>);

impl Early {
    /// Keeps what there is room for; returns how many flows were dropped.
    fn hold(&mut self, vs_id: u32, owner: u32, flows: Vec<Client>, now: Instant) -> usize {
        let room = EARLY_MAX.saturating_sub(self.0.values().map(Vec::len).sum());
        let dropped = flows.len().saturating_sub(room);
        self.0
            .entry(vs_id)
            .or_default()
            .extend(flows.into_iter().take(room).map(|c| (now, owner, c)));
        dropped
    }

    /// The (owner, flow) pairs of `vs_id` still fresh at `now`; none are kept.
    fn take(&mut self, vs_id: u32, now: Instant) -> Vec<(u32, Client)> {
        self.0
            .remove(&vs_id)
            .unwrap_or_default()
            .into_iter()
            .filter(|(at, ..)| now.duration_since(*at) < EARLY_TTL)
            .map(|(_, owner, c)| (owner, c))
            .collect()
    }

    /// Forgets what is older than [`EARLY_TTL`].
    fn expire(&mut self, now: Instant) {
        self.0.retain(|_, flows| {
            flows.retain(|(at, ..)| now.duration_since(*at) < EARLY_TTL);
            !flows.is_empty()
        });
    }
}

/// Asks `peers` which of `clients` (of `vs_id`, all pending) they own, in messages of
/// [`FLOWS_PER_MESSAGE`]; each flow remembers the query that asked about it last.
async fn ask(
    sender: &Sender,
    pending: &mut HashMap<(u32, Client), Pending>,
    in_flight: &mut InFlight,
    vs_id: u32,
    clients: &[Client],
    peers: &[SocketAddr],
) {
    for chunk in clients.chunks(FLOWS_PER_MESSAGE) {
        let seq = in_flight.open(pending, vs_id, chunk);
        let body = encode_flows(vs_id, chunk);
        for addr in peers {
            sender.send(*addr, Kind::Query, seq, body.clone()).await;
        }
    }
}

/// The owner queries in flight: each query's flows by its sequence number, so that an answer
/// touches its own flows and not every pending one (under a storm of unknown segments thousands
/// of flows wait and thousands of answers arrive per second).
#[derive(Debug, Default)]
struct InFlight {
    last: u64,
    flows: HashMap<u64, (u32, Vec<Client>)>,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight::default()
    }

    /// A new query about `clients` of `vs_id` (all pending): its sequence number, which each
    /// flow remembers as the query that asked about it last.
    fn open(
        &mut self,
        pending: &mut HashMap<(u32, Client), Pending>,
        vs_id: u32,
        clients: &[Client],
    ) -> u64 {
        self.last += 1;
        for c in clients {
            if let Some(p) = pending.get_mut(&(vs_id, *c)) {
                p.seq = self.last;
            }
        }
        self.flows.insert(self.last, (vs_id, clients.to_vec()));
        self.last
    }

    /// Engine `from` answered query `seq` of `vs_id`, owning `owned`: those flows have their
    /// owner (whichever query asked), and every flow `seq` was the last query of has `from`'s
    /// answer. Returns the flows of the query (to settle with `owned`).
    fn answered(
        &self,
        pending: &mut HashMap<(u32, Client), Pending>,
        vs_id: u32,
        seq: u64,
        from: u32,
        owned: &[Client],
    ) -> &[Client] {
        for c in owned {
            if let Some(p) = pending.get_mut(&(vs_id, *c)) {
                p.owner.get_or_insert(from);
            }
        }
        let Some((_, asked)) = self.flows.get(&seq).filter(|(vs, _)| *vs == vs_id) else {
            return &[];
        };
        for c in asked {
            if let Some(p) = pending.get_mut(&(vs_id, *c))
                && p.seq == seq
                && p.asked.contains(&from)
                && !p.answered.contains(&from)
            {
                p.answered.push(from);
            }
        }
        asked
    }

    /// Forgets the queries none of whose flows waits on them any more.
    fn forget_settled(&mut self, pending: &HashMap<(u32, Client), Pending>) {
        self.flows.retain(|seq, (vs_id, clients)| {
            clients
                .iter()
                .any(|c| pending.get(&(*vs_id, *c)).is_some_and(|p| p.seq == *seq))
        });
    }
}

/// Writes pushed (owner, flow) pairs the table does not know yet; returns how many were written.
fn bulk_load(
    tables: &mut ConnTables,
    counters: &OwnerCounters,
    s: &Service,
    vs_id: u32,
    flows: impl Iterator<Item = (u32, Client)>,
) -> u64 {
    let mut n = 0u64;
    for (owner, c) in flows {
        if tables.write(s, vs_id, c, owner) {
            n += 1;
        }
    }
    counters.bulk_loaded.fetch_add(n, Ordering::Relaxed);
    n
}

/// (service, the peers to ask) → the flows to ask them about again.
type AskAgain = BTreeMap<(u32, Vec<SocketAddr>), Vec<Client>>;

/// The sweep: decides the flows that can be (an owner found, everyone answered, or time is up
/// and the retries are spent). Returns the flows whose engines are to be asked again: time is
/// up, some have not answered, retries are left.
fn settle(
    pending: &mut HashMap<(u32, Client), Pending>,
    plan: &OwnerPlan,
    tables: &mut ConnTables,
    rings: &Rings,
    counters: &OwnerCounters,
) -> AskAgain {
    let now = Instant::now();
    let mut again = AskAgain::new();
    pending.retain(|(vs_id, client), p| {
        let peers = plan.services.get(vs_id).map_or(&[][..], |s| &s.peers[..]);
        match next_step(p, peers, now, true) {
            Step::Wait => true,
            Step::AskAgain(silent) => {
                p.retries += 1;
                p.since = now;
                counters.retried.fetch_add(1, Ordering::Relaxed);
                again.entry((*vs_id, silent)).or_default().push(*client);
                true
            }
            Step::Decide => {
                decide(*vs_id, *client, p, plan, tables, rings, counters, now);
                false
            }
        }
    });
    again
}

/// Whether this engine holds `client`'s flow to `s`: in the proxy's connection table or, for TCP,
/// in the kernel's socket table before the proxy has accepted it (see [`crate::kernel_sockets`]).
fn holds(
    conns: &ConnTable,
    kernel: &mut Option<(KernelSockets, Budget)>,
    counters: &OwnerCounters,
    s: &Service,
    client: Client,
) -> bool {
    let key = FlowKey {
        client,
        vip: s.vip,
        protocol: s.protocol,
    };
    if conns.contains(&key) {
        return true;
    }
    let Some((kernel, budget)) = kernel.as_mut().filter(|_| s.protocol == Protocol::Tcp) else {
        return false;
    };
    if !budget.take(Instant::now()) {
        counters.kernel_over_budget.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    match kernel.has_tcp(s.vip, client) {
        Ok(held) => {
            if held {
                counters.kernel_held.fetch_add(1, Ordering::Relaxed);
            }
            held
        }
        Err(e) => {
            debug!(%client, "socket table lookup: {e}");
            false
        }
    }
}

/// Decides those of `clients` (of `vs_id`) that can be without waiting: an owner found or
/// everyone answered. Time-outs are the sweep's.
fn settle_flows(
    pending: &mut HashMap<(u32, Client), Pending>,
    vs_id: u32,
    clients: &[Client],
    plan: &OwnerPlan,
    tables: &mut ConnTables,
    rings: &Rings,
    counters: &OwnerCounters,
) {
    let now = Instant::now();
    let peers = plan.services.get(&vs_id).map_or(&[][..], |s| &s.peers[..]);
    for c in clients {
        let key = (vs_id, *c);
        if pending
            .get(&key)
            .is_some_and(|p| next_step(p, peers, now, false) == Step::Decide)
            && let Some(p) = pending.remove(&key)
        {
            decide(vs_id, *c, &p, plan, tables, rings, counters, now);
        }
    }
}

/// Writes where `client`'s flow goes: its owner, or if nobody owns it this engine (TCP) or
/// where the ring places it (UDP), and counts which.
#[allow(clippy::too_many_arguments)]
fn decide(
    vs_id: u32,
    client: Client,
    p: &Pending,
    plan: &OwnerPlan,
    tables: &mut ConnTables,
    rings: &Rings,
    counters: &OwnerCounters,
    now: Instant,
) {
    let Some(s) = plan.services.get(&vs_id) else {
        return;
    };
    let all_answered = p.asked.iter().all(|id| p.answered.contains(id));
    let owner = if let Some(o) = p.owner {
        counters.answered.fetch_add(1, Ordering::Relaxed);
        o
    } else {
        if all_answered {
            counters.unowned.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.unanswered.fetch_add(1, Ordering::Relaxed);
        }
        // Nobody owns it. TCP: this engine takes it, and its stack resets the stray segment.
        // UDP: a new session where the ring places it.
        let placed = (s.protocol == Protocol::Udp)
            .then(|| {
                let r = rings
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                ring_owner(r.get(&vs_id)?, s, client)
            })
            .flatten();
        placed.unwrap_or(plan.self_id)
    };
    counters
        .latency
        .observe(now.duration_since(p.first).as_secs_f64());
    tables.write(s, vs_id, client, owner);
}

/// What a pending flow needs now.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Answers may still come.
    Wait,
    /// Time is up, these engines (of those asked) have not answered, retries are left.
    AskAgain(Vec<SocketAddr>),
    /// An owner is known, everyone answered, or nobody is left to wait for.
    Decide,
}

/// The next step of `p`, whose service has `peers`, at `now` (`sweep`: time-outs are checked).
fn next_step(p: &Pending, peers: &[(u32, SocketAddr)], now: Instant, sweep: bool) -> Step {
    if p.owner.is_some() || p.asked.iter().all(|id| p.answered.contains(id)) {
        return Step::Decide;
    }
    if !sweep || now.duration_since(p.since) < QUERY_TIMEOUT {
        return Step::Wait;
    }
    let silent: Vec<SocketAddr> = peers
        .iter()
        .filter(|(id, _)| p.asked.contains(id) && !p.answered.contains(id))
        .map(|(_, addr)| *addr)
        .collect();
    if p.retries < QUERY_RETRIES && !silent.is_empty() {
        Step::AskAgain(silent)
    } else {
        Step::Decide
    }
}

/// `plan` as the channel has it now, cloned only if it changed (not marked seen: the task's
/// `changed` arm still runs for it).
fn refresh(rx: &watch::Receiver<OwnerPlan>, plan: &mut OwnerPlan) {
    if rx.has_changed().unwrap_or(false) {
        *plan = rx.borrow().clone();
    }
}

/// The ring buffer, pollable.
struct QueryRing(RingBuf<MapData>);

impl QueryRing {
    fn next_query(&mut self) -> Option<OwnerQuery> {
        let item = self.0.next()?;
        if item.len() < std::mem::size_of::<OwnerQuery>() {
            return None;
        }
        // SAFETY: `OwnerQuery` is plain old data of that many bytes; read unaligned.
        Some(unsafe { item.as_ptr().cast::<OwnerQuery>().read_unaligned() })
    }
}

impl AsRawFd for QueryRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_pushed_early_are_kept_a_while_within_a_bound() {
        let t0 = Instant::now();
        let c1: Client = "10.0.0.2:40000".parse().unwrap();
        let c2: Client = "10.0.0.2:40001".parse().unwrap();
        let mut early = Early::default();
        assert_eq!(early.hold(0, 4, vec![c1], t0), 0);
        assert_eq!(early.hold(1, 4, vec![c2], t0), 0);
        assert_eq!(early.take(0, t0 + Duration::from_secs(1)), [(4, c1)]);
        assert!(early.take(0, t0).is_empty(), "taken once");
        assert!(early.take(1, t0 + EARLY_TTL).is_empty(), "stale");
        // The bound counts every service's flows.
        let many: Vec<Client> = (0..EARLY_MAX)
            .map(|i| {
                SocketAddr::new(
                    "10.1.0.1".parse().unwrap(),
                    u16::try_from(i % 60_000).unwrap(),
                )
            })
            .collect();
        assert_eq!(early.hold(2, 5, vec![c1], t0), 0);
        assert_eq!(early.hold(3, 5, many, t0), 1, "one over the bound");
        early.expire(t0 + EARLY_TTL);
        assert!(early.0.is_empty());
    }

    fn waiting(asked: &[u32], t0: Instant) -> Pending {
        Pending {
            seq: 0,
            asked: asked.to_vec(),
            answered: Vec::new(),
            owner: None,
            first: t0,
            since: t0,
            retries: 0,
        }
    }

    /// An answer marks the flows of its own query answered by its sender, and gives an owner to the
    /// flows it names, whichever query asked; flows of other queries or services are untouched,
    /// and a query is forgotten once no flow waits on it.
    #[test]
    fn an_answer_touches_its_querys_flows_and_those_it_names() {
        let t0 = Instant::now();
        let c = |port: u16| -> Client { SocketAddr::new("10.0.0.9".parse().unwrap(), port) };
        let mut pending = HashMap::new();
        for port in 1..=6 {
            pending.insert((7, c(port)), waiting(&[2, 3], t0));
        }
        pending.insert((8, c(1)), waiting(&[2, 3], t0));
        let mut in_flight = InFlight::new();
        let first = in_flight.open(&mut pending, 7, &[c(1), c(2), c(3)]);
        let second = in_flight.open(&mut pending, 7, &[c(4), c(5)]);
        let other = in_flight.open(&mut pending, 8, &[c(1)]);
        assert!(first < second && second < other);
        // c(3) asked again: the first query's answers no longer count for it.
        let again = in_flight.open(&mut pending, 7, &[c(3)]);

        let asked = in_flight.answered(&mut pending, 7, first, 2, &[c(2), c(4)]);
        assert_eq!(asked, [c(1), c(2), c(3)]);
        let answered = |p: &HashMap<(u32, Client), Pending>, vs: u32, port: u16| {
            p[&(vs, c(port))].answered.clone()
        };
        assert_eq!(answered(&pending, 7, 1), [2]);
        assert_eq!(answered(&pending, 7, 2), [2]);
        assert!(answered(&pending, 7, 3).is_empty(), "asked again since");
        assert!(answered(&pending, 7, 4).is_empty(), "another query");
        assert!(answered(&pending, 8, 1).is_empty(), "another service");
        assert_eq!(pending[&(7, c(2))].owner, Some(2));
        assert_eq!(
            pending[&(7, c(4))].owner,
            Some(2),
            "owned, whichever query asked"
        );
        assert_eq!(pending[&(7, c(1))].owner, None);
        // An engine not asked about a flow does not answer for it; an unknown query touches nothing.
        in_flight.answered(&mut pending, 7, second, 9, &[]);
        assert!(answered(&pending, 7, 4).is_empty());
        assert!(in_flight.answered(&mut pending, 7, 999, 3, &[]).is_empty());
        assert!(
            in_flight
                .answered(&mut pending, 8, first, 3, &[])
                .is_empty(),
            "not that service's query"
        );

        // The first query's flows settle; it and nothing else is forgotten.
        pending.remove(&(7, c(1)));
        pending.remove(&(7, c(2)));
        in_flight.forget_settled(&pending);
        let mut left: Vec<u64> = in_flight.flows.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, [second, other, again]);
        pending.clear();
        in_flight.forget_settled(&pending);
        assert!(in_flight.flows.is_empty());
    }

    #[test]
    fn silent_engines_are_asked_again_until_the_retries_are_spent() {
        let t0 = Instant::now();
        let a: SocketAddr = "10.0.0.2:7401".parse().unwrap();
        let b: SocketAddr = "10.0.0.3:7401".parse().unwrap();
        let peers = [(2, a), (3, b)];
        let mut p = Pending {
            seq: 1,
            asked: vec![2, 3],
            answered: vec![3],
            owner: None,
            first: t0,
            since: t0,
            retries: 0,
        };
        let late = t0 + QUERY_TIMEOUT;
        assert_eq!(next_step(&p, &peers, t0, true), Step::Wait, "in time");
        assert_eq!(
            next_step(&p, &peers, late, false),
            Step::Wait,
            "not a sweep"
        );
        assert_eq!(
            next_step(&p, &peers, late, true),
            Step::AskAgain(vec![a]),
            "only the silent one"
        );
        p.retries = QUERY_RETRIES;
        assert_eq!(
            next_step(&p, &peers, late, true),
            Step::Decide,
            "retries spent"
        );
        p.retries = 0;
        // The silent engine left the service meanwhile: nobody to wait for.
        assert_eq!(next_step(&p, &[(3, b)], late, true), Step::Decide);
        p.answered.push(2);
        assert_eq!(
            next_step(&p, &peers, t0, false),
            Step::Decide,
            "all answered"
        );
        p.answered.clear();
        p.owner = Some(2);
        assert_eq!(next_step(&p, &peers, t0, false), Step::Decide, "an owner");
    }

    #[test]
    fn flows_round_trip_both_families() {
        let flows: Vec<Client> = vec![
            "10.0.0.2:40000".parse().unwrap(),
            "[fd00::2]:40001".parse().unwrap(),
        ];
        let b = encode_flows(7, &flows);
        assert_eq!(b.len(), 4 + 2 * FLOW_LEN);
        assert_eq!(decode_flows(&b), Some((7, flows)));
        assert_eq!(decode_flows(&b[..5]), None, "cut short");
        assert_eq!(decode_flows(&[0; 3]), None);
        assert_eq!(
            decode_flows(&7u32.to_be_bytes()),
            Some((7, Vec::new())),
            "none owned"
        );
    }

    #[test]
    fn a_query_record_names_its_client() {
        let q = OwnerQuery {
            vs_id: 1,
            family: FAMILY_V4,
            proto: 6,
            _pad: 0,
            src_be: [u32::from(Ipv4Addr::new(10, 0, 0, 2)).to_be(), 0, 0, 0],
            dst_be: [0; 4],
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
        };
        assert_eq!(client_of(&q), "10.0.0.2:40000".parse().unwrap());
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        let q6 = OwnerQuery {
            family: lb_common::FAMILY_V6,
            src_be: v6_be(v6),
            ..q
        };
        assert_eq!(client_of(&q6), "[fd00::2]:40000".parse().unwrap());
    }
}
