//! A backend server of a pool and its live state, shared by the pool (selection), the health
//! checker (health) and the proxy (connection counts, bytes).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

/// Source addresses of connections (and health checks) to backends, by the backend's family
/// (`proxy.source_v4` / `proxy.source_v6`): the engine's own address, so replies come back to it.
/// `None`: the kernel's choice (the address of the interface the backend is routed through).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl SourceAddrs {
    pub fn of(proxy: &crate::config::ProxyConfig) -> Self {
        SourceAddrs {
            v4: proxy.source_v4,
            v6: proxy.source_v6,
        }
    }

    /// The source address for connections to `peer`.
    pub fn for_peer(&self, peer: IpAddr) -> Option<IpAddr> {
        match peer {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }
}

/// One backend. Counters are plain atomics: the proxy updates them per connection, the metrics
/// endpoint reads them at scrape time. A backend is the same object across reloads that keep its
/// address ([`Backend::reconfigure`]), so its health, counters and open connections carry over.
#[derive(Debug)]
pub struct Backend {
    /// Position in its pool's configuration.
    index: AtomicU32,
    pub addr: SocketAddr,
    weight: AtomicU32,
    /// Administratively enabled (configuration).
    enabled: AtomicBool,
    /// Set by the health checker; starts healthy until a check says otherwise (`fall` failures).
    healthy: AtomicBool,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections ever opened to it.
    pub total: AtomicU64,
    /// Connection attempts that failed (refused, timed out, unreachable).
    pub connect_failures: AtomicU64,
    /// Bytes from clients to this backend, and back.
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Health state changes (up → down and down → up).
    pub health_changes: AtomicU64,
}

impl Backend {
    pub fn new(index: u32, addr: SocketAddr, weight: u32, enabled: bool) -> Self {
        Backend {
            index: AtomicU32::new(index),
            addr,
            weight: AtomicU32::new(weight),
            enabled: AtomicBool::new(enabled),
            healthy: AtomicBool::new(true),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            health_changes: AtomicU64::new(0),
        }
    }

    /// Takes a new position and settings from a reloaded configuration; health, counters and open
    /// connections stay.
    pub fn reconfigure(&self, index: u32, weight: u32, enabled: bool) {
        self.index.store(index, Ordering::Relaxed);
        self.weight.store(weight, Ordering::Relaxed);
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn index(&self) -> u32 {
        self.index.load(Ordering::Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a health verdict; returns true when it changed the state.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed {
            self.health_changes.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }

    /// May take new connections: enabled, healthy and of non-zero weight.
    pub fn is_usable(&self) -> bool {
        self.enabled() && self.weight() > 0 && self.is_healthy()
    }

    /// A connection to it opened: counts it until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Decrements the backend's active count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_needs_enabled_healthy_and_weight() {
        let b = Backend::new(0, "10.0.0.1:80".parse().unwrap(), 1, true);
        assert!(b.is_usable());
        assert!(b.set_healthy(false));
        assert!(!b.set_healthy(false), "no change, not counted");
        assert!(!b.is_usable());
        assert_eq!(b.health_changes.load(Ordering::Relaxed), 1);
        assert!(!Backend::new(0, "10.0.0.1:80".parse().unwrap(), 0, true).is_usable());
        assert!(!Backend::new(0, "10.0.0.1:80".parse().unwrap(), 1, false).is_usable());
    }

    #[test]
    fn guard_counts_active_connections() {
        let b = Arc::new(Backend::new(0, "10.0.0.1:80".parse().unwrap(), 1, true));
        {
            let _g1 = b.open();
            let _g2 = b.open();
            assert_eq!(b.active.load(Ordering::Relaxed), 2);
        }
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
        assert_eq!(b.total.load(Ordering::Relaxed), 2);
    }
}
