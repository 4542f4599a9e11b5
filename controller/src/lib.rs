//! The controller: owns the desired state and is the only API operators call.
//!
//! ```text
//!   main ── load store (redb) ── Cluster (one owner, behind a mutex)
//!     ├── gRPC server (mTLS): Operator API (api.rs), EngineApi (engines.rs), health, reflection
//!     │     └── per engine: a session task — pushes each snapshot version until ACKed,
//!     │         feeds heartbeats, ACKs and NACKs into the Cluster
//!     └── ticker (every heartbeat interval): Cluster::tick — engine health, re-placement,
//!         anomalies, a new snapshot version when anything changed
//! ```

pub mod api;
pub mod cluster;
pub mod engines;
pub mod events;
pub mod health;
pub mod placement;
pub mod rebalance;
pub mod simulate;
pub mod store;
pub mod tls;
