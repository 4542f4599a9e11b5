//! Mutual TLS between the controller, the engines and lbctl.
//!
//! A development PKI ([`init_pki`], `lbctl certs init`): one CA; a controller certificate for the
//! names and addresses it is reached at; a client certificate per engine (`CN=engine:<name>`) and
//! per operator (`CN=operator:<name>`). The controller requires a client certificate of its CA on
//! every call and checks the role in its common name: an engine certificate cannot call the
//! operator API, and an engine can only speak for the engine its certificate names.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::{
    Request, Status,
    transport::{Certificate, Identity, ServerTlsConfig},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Engine,
    Operator,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Engine => "engine:",
            Role::Operator => "operator:",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("making certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| TlsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)
}

pub use lb_api::tls::{cert_path, client_config};

/// Writes a development CA and certificates into `dir`: the controller's for `controller_names`
/// (DNS names or IP addresses), one per engine and per operator. Returns the files written.
pub fn init_pki(
    dir: &Path,
    controller_names: &[String],
    engines: &[String],
    operators: &[String],
) -> Result<Vec<PathBuf>, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| TlsError::File {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lb development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let mut written = Vec::new();
    let ca_pem = dir.join("ca.pem");
    write(&ca_pem, &ca.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key_pem, true)?;
    written.extend([ca_pem, dir.join("ca.key")]);

    let mut issue =
        |who: String, cn: String, sans: &[String], server: bool| -> Result<(), TlsError> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, cn);
            for s in sans {
                params.subject_alt_names.push(match s.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(s.clone().try_into()?),
                });
            }
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            let (pem, key_path) = cert_path(dir, &who);
            write(&pem, &cert.pem(), false)?;
            write(&key_path, &key.serialize_pem(), true)?;
            written.extend([pem, key_path]);
            Ok(())
        };
    issue(
        "controller".into(),
        "lb controller".into(),
        controller_names,
        true,
    )?;
    for e in engines {
        issue(format!("engine-{e}"), format!("engine:{e}"), &[], false)?;
    }
    for o in operators {
        issue(format!("operator-{o}"), format!("operator:{o}"), &[], false)?;
    }
    Ok(written)
}

/// The controller's TLS: its certificate, client certificates of `ca` required.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .client_ca_root(Certificate::from_pem(read(ca)?)))
}

/// The common name of the peer's (verified) client certificate.
fn peer_cn<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    let der = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// The name in the peer's certificate if it has `role`, else `PermissionDenied` (the TLS layer has
/// already refused peers without a certificate of the CA).
pub fn require<T>(req: &Request<T>, role: Role) -> Result<String, Status> {
    let cn = peer_cn(req).ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    cn.strip_prefix(role.prefix())
        .map(str::to_owned)
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "certificate {cn:?} may not call this API (it needs a {}<name> certificate)",
                role.prefix()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_files_and_names() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let files = init_pki(
            dir.path(),
            &["127.0.0.1".into(), "controller.lab".into()],
            &["se1".into()],
            &["admin".into()],
        )
        .unwrap();
        assert_eq!(files.len(), 8);
        let pem = std::fs::read_to_string(dir.path().join("engine-se1.pem")).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "engine:se1"
        );
        let mode = std::fs::metadata(dir.path().join("operator-admin.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");
        server_config(
            &dir.path().join("ca.pem"),
            &dir.path().join("controller.pem"),
            &dir.path().join("controller.key"),
        )
        .unwrap();
    }
}
