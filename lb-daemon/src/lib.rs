//! The load balancer daemon: configuration, data-plane control and the control plane around it.

pub mod announce;
pub mod backend;
pub mod bgp;
pub mod config;
pub mod conntable;
pub mod dataplane;
pub mod engine;
pub mod failover;
pub mod health;
pub mod heartbeat;
pub mod kernel_sockets;
pub mod links;
pub mod managed;
pub mod metrics;
pub mod mirror;
pub mod owners;
pub mod peers;
pub mod pool;
pub mod proxy;
pub mod roles;
pub mod tables;
pub mod tx_errors;
