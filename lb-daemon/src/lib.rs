//! The load balancer daemon: configuration, data-plane control and the control plane around it.

pub mod config;
pub mod dataplane;
pub mod links;
pub mod metrics;
pub mod tables;
