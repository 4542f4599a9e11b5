//! Types shared by the XDP data plane (`lb-ebpf`) and userspace (`lb-daemon`, tests, benchmarks).
//!
//! Everything placed in a BPF map is `#[repr(C)]` with explicit padding and a size assertion, so
//! both sides agree on the layout byte for byte. Fields that hold network-order data say so with a
//! `_be` suffix: they hold the bytes exactly as they appear in the packet, read as a native `u32`/`u16`.
//!
//! With the `user` feature (userspace only) the types implement `aya::Pod`, and the Maglev builder and
//! address helpers become available.
#![cfg_attr(not(feature = "user"), no_std)]
// `_pad` fields are explicit padding of map types, public so both sides can build values.
#![allow(clippy::pub_underscore_fields)]
// The hash runs inside the XDP program, where every call must be inlined.
#![allow(clippy::inline_always)]

pub mod counters;
pub mod hash;
pub mod maps;

#[cfg(feature = "user")]
pub mod addr;
#[cfg(feature = "user")]
pub mod maglev;

pub use counters::{REASON_COUNT, Reason, TX_ERROR_COUNT, TrafficCounters, TxError, TxErrorFilter};
pub use maps::*;
