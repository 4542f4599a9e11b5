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

/// TLS files of the development PKI (`lbctl certs init`) and client settings shared by engines and
/// lbctl.
pub mod tls {
    use std::path::{Path, PathBuf};

    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    /// `<dir>/<who>.pem` and `<dir>/<who>.key` (`who`: `controller`, `engine-se1`, `operator-admin`).
    pub fn cert_path(dir: &Path, who: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{who}.pem")),
            dir.join(format!("{who}.key")),
        )
    }

    fn read(path: &Path) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A client's TLS (an engine or lbctl): trust `dir/ca.pem`, present `dir/<who>.pem`.
    pub fn client_config(dir: &Path, who: &str) -> Result<ClientTlsConfig, String> {
        let (cert, key) = cert_path(dir, who);
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&dir.join("ca.pem"))?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?)))
    }
}
