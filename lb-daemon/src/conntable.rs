//! Every connection (TCP) and session (UDP) the engine's proxy holds, keyed by the client's
//! 5-tuple. Listed and looked up through the daemon's admin endpoint (`GET /connections`); the
//! failover work asks engines "do you own this flow?" through the same lookup.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use dashmap::DashMap;
use serde::Serialize;

use crate::{config::Protocol, proxy::relay::Progress};

/// The client side of a proxied flow: (client address and port, VIP and port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: Protocol,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ConnState {
    /// Accepted; connecting to the backend.
    Connecting = 0,
    /// Relaying.
    Established = 1,
    /// Its engine or virtual service drains: it continues until the drain deadline.
    Draining = 2,
}

/// One proxied connection or UDP session.
#[derive(Debug)]
pub struct Conn {
    pub key: FlowKey,
    pub virtual_service: Arc<str>,
    pub backend: SocketAddr,
    /// The engine-side address and port of the backend connection (the source-NAT address).
    engine_side: std::sync::OnceLock<SocketAddr>,
    pub started: SystemTime,
    started_at: Instant,
    state: AtomicU8,
    /// Bytes moved each way, updated by the relay as they move.
    pub bytes: Arc<Progress>,
}

impl Conn {
    pub fn set_engine_side(&self, addr: SocketAddr) {
        let _ = self.engine_side.set(addr);
    }

    pub fn set_state(&self, s: ConnState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ConnState {
        match self.state.load(Ordering::Relaxed) {
            0 => ConnState::Connecting,
            1 => ConnState::Established,
            _ => ConnState::Draining,
        }
    }

    /// A point-in-time copy for listing.
    pub fn snapshot(&self) -> ConnSnapshot {
        ConnSnapshot {
            client: self.key.client,
            vip: self.key.vip,
            protocol: self.key.protocol,
            virtual_service: self.virtual_service.to_string(),
            backend: self.backend,
            engine_side: self.engine_side.get().copied(),
            bytes_to_backend: self.bytes.to_backend.load(Ordering::Relaxed),
            bytes_to_client: self.bytes.to_client.load(Ordering::Relaxed),
            started_unix_ms: self
                .started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            age_ms: u64::try_from(self.started_at.elapsed().as_millis()).unwrap_or(u64::MAX),
            state: self.state(),
        }
    }
}

/// What `GET /connections` returns for each connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnSnapshot {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub virtual_service: String,
    pub backend: SocketAddr,
    pub engine_side: Option<SocketAddr>,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub started_unix_ms: u64,
    pub age_ms: u64,
    pub state: ConnState,
}

/// The table. Cheap to share (`Arc`); entries leave it when their [`Registration`] drops.
#[derive(Debug, Default)]
pub struct ConnTable {
    map: DashMap<FlowKey, Arc<Conn>>,
}

impl ConnTable {
    /// Adds a connection; it is removed when the returned registration drops. A stale entry with
    /// the same key (a client reusing its port before the old connection was cleaned up) is replaced.
    pub fn register(
        self: &Arc<Self>,
        key: FlowKey,
        virtual_service: Arc<str>,
        backend: SocketAddr,
        bytes: Arc<Progress>,
    ) -> Registration {
        let conn = Arc::new(Conn {
            key,
            virtual_service,
            backend,
            engine_side: std::sync::OnceLock::new(),
            started: SystemTime::now(),
            started_at: Instant::now(),
            state: AtomicU8::new(ConnState::Connecting as u8),
            bytes,
        });
        self.map.insert(key, conn.clone());
        Registration {
            table: self.clone(),
            conn,
        }
    }

    pub fn get(&self, key: &FlowKey) -> Option<ConnSnapshot> {
        self.map.get(key).map(|c| c.snapshot())
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.map.contains_key(key)
    }

    /// The clients (address and port) of every connection to `vip` over `protocol`.
    pub fn clients_of(&self, vip: SocketAddr, protocol: Protocol) -> Vec<SocketAddr> {
        self.map
            .iter()
            .filter(|c| c.key.vip == vip && c.key.protocol == protocol)
            .map(|c| c.key.client)
            .collect()
    }

    /// Every connection, optionally only those of one virtual service.
    pub fn list(&self, virtual_service: Option<&str>) -> Vec<ConnSnapshot> {
        self.map
            .iter()
            .filter(|c| virtual_service.is_none_or(|v| &*c.virtual_service == v))
            .map(|c| c.snapshot())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Keeps a connection in the table while it lives.
#[derive(Debug)]
pub struct Registration {
    table: Arc<ConnTable>,
    pub conn: Arc<Conn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Only remove our own entry: a newer connection may have replaced it under the same key.
        self.table
            .map
            .remove_if(&self.conn.key, |_, c| Arc::ptr_eq(c, &self.conn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            client: SocketAddr::from(([10, 0, 0, 1], port)),
            vip: SocketAddr::from(([10, 78, 0, 10], 80)),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn register_lookup_and_remove_on_drop() {
        let t = Arc::new(ConnTable::default());
        let bytes = Arc::new(Progress::default());
        let r = t.register(
            key(1000),
            "web".into(),
            "10.0.1.1:80".parse().unwrap(),
            bytes.clone(),
        );
        r.conn.set_engine_side("10.0.0.9:40000".parse().unwrap());
        r.conn.set_state(ConnState::Established);
        bytes.to_backend.fetch_add(10, Ordering::Relaxed);
        let s = t.get(&key(1000)).unwrap();
        assert_eq!(
            (s.backend, s.engine_side, s.bytes_to_backend, s.state),
            (
                "10.0.1.1:80".parse().unwrap(),
                Some("10.0.0.9:40000".parse().unwrap()),
                10,
                ConnState::Established
            )
        );
        assert!(t.get(&key(1001)).is_none());
        assert_eq!(t.list(Some("web")).len(), 1);
        assert!(t.list(Some("other")).is_empty());
        drop(r);
        assert!(t.is_empty());
    }

    #[test]
    fn a_replaced_entry_is_not_removed_by_the_old_registration() {
        let t = Arc::new(ConnTable::default());
        let old = t.register(
            key(1),
            "web".into(),
            "10.0.1.1:80".parse().unwrap(),
            Arc::default(),
        );
        let new = t.register(
            key(1),
            "web".into(),
            "10.0.1.2:80".parse().unwrap(),
            Arc::default(),
        );
        drop(old);
        assert_eq!(
            t.get(&key(1)).unwrap().backend,
            "10.0.1.2:80".parse().unwrap()
        );
        drop(new);
        assert!(t.is_empty());
    }
}
