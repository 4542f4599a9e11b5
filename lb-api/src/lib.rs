//! The load balancer's gRPC API, package `lb.v1` (`proto/lb/v1`): [`v1::operator_server`] /
//! [`v1::operator_client`] (the operator API the controller serves and lbctl calls) and
//! [`v1::engine_api_server`] / [`v1::engine_api_client`] (engines' registration and session).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("lb.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lb_descriptor.bin"));
