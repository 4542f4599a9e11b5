//! The controller as a process on loopback, called over mutual TLS: bad input of every kind gets a
//! status (never a panic or a hang), concurrent conflicting updates are serialised, and the state
//! read afterwards is consistent.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_api::v1::{self as pb, operator_client::OperatorClient};
use tonic::{Code, transport::Channel};

struct Controller {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> Controller {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    controller::tls::init_pki(
        &pki,
        &["127.0.0.1".into()],
        &["se1".into()],
        &["admin".into()],
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_controller"))
        .args(["--listen", &addr.to_string(), "--tls-dir"])
        .arg(&pki)
        .arg("--db")
        .arg(dir.path().join("c.redb"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the controller did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Controller {
        child,
        addr,
        _dir: dir,
        pki,
    }
}

async fn client(c: &Controller, pki: &Path, who: &str) -> Result<OperatorClient<Channel>, String> {
    let tls = controller::tls::client_config(pki, who)?;
    let ch = Channel::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(OperatorClient::new(ch))
}

fn pool(name: &str, weight: u32) -> pb::Pool {
    pb::Pool {
        name: name.into(),
        backends: vec![pb::Backend {
            address: "10.0.0.1".into(),
            port: 80,
            weight: Some(weight),
            enabled: None,
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn bad_input_gets_statuses_and_the_state_stays_consistent() {
    let c = start();
    let mut op = client(&c, &c.pki, "operator-admin").await.unwrap();

    // Garbage and truncated HTTP/2 on the port: the connection is dropped, the controller lives.
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 4096],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04".to_vec(),
    ] {
        let mut s = TcpStream::connect(c.addr).unwrap();
        let _ = s.write_all(&junk);
        drop(s);
    }
    // Invalid calls: a status naming the field, nothing changed.
    let cases: Vec<(pb::Pool, Code, &str)> = vec![
        (pool("", 1), Code::InvalidArgument, "name"),
        (
            pool("bad name", 1),
            Code::InvalidArgument,
            "not a valid name",
        ),
        (pool("p", 70_000), Code::InvalidArgument, "weight"),
        (
            pb::Pool {
                backends: vec![pb::Backend {
                    address: "not-an-ip".into(),
                    port: 80,
                    ..Default::default()
                }],
                ..pool("p", 1)
            },
            Code::InvalidArgument,
            "backends[0].address",
        ),
        (
            pb::Pool {
                backends: vec![pb::Backend {
                    address: "10.0.0.1".into(),
                    port: 0,
                    ..Default::default()
                }],
                ..pool("p", 1)
            },
            Code::InvalidArgument,
            "backends[0].port",
        ),
        (
            pb::Pool {
                algorithm: "random".into(),
                ..pool("p", 1)
            },
            Code::InvalidArgument,
            "algorithm",
        ),
        (
            pool(&"x".repeat(10_000), 1),
            Code::InvalidArgument,
            "bytes long",
        ),
    ];
    for (p, code, want) in cases {
        let err = op.create_pool(p).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    let vs = |port: u32| pb::VirtualService {
        name: "web".into(),
        vip: "10.78.0.10".into(),
        port,
        pool: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        op.create_virtual_service(vs(0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        op.create_virtual_service(vs(80)).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        op.get_virtual_service(pb::Name { name: "x".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // An oversized message.
    let huge = pb::Pool {
        backends: (0..200_000)
            .map(|i| pb::Backend {
                address: format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                port: 80,
                ..Default::default()
            })
            .collect(),
        ..pool("huge", 1)
    };
    let err = op.create_pool(huge).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::InvalidArgument | Code::OutOfRange
        ),
        "{err:?}"
    );
    assert!(
        op.list_pools(pb::Empty {})
            .await
            .unwrap()
            .into_inner()
            .pools
            .is_empty()
    );

    // A watcher sees the change as an event: time, kind, objects, reason.
    let mut watch = op.watch_events(pb::Empty {}).await.unwrap().into_inner();
    op.create_pool(pool("web", 1)).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .expect("the stream is open");
    assert_eq!(
        (e.kind.as_str(), e.objects.as_slice()),
        ("placement", ["pool/web".to_owned()].as_slice())
    );
    assert_eq!(e.reason, "created");
    assert!(
        e.time_unix_ms > 1_700_000_000_000,
        "a wall-clock time: {}",
        e.time_unix_ms
    );

    // 100 concurrent updates against the same resource version: exactly one wins.
    let mut tasks = Vec::new();
    for w in 0..100u32 {
        let mut op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut p = pool("web", w + 2);
            p.resource_version = 1;
            op.update_pool(p)
                .await
                .map(|r| r.into_inner().backends[0].weight)
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(w) => won.push(w),
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    assert_eq!(won.len(), 1, "one update wins");
    let stored = op
        .get_pool(pb::Name { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.resource_version, 2);
    assert_eq!(
        stored.backends[0].weight, won[0],
        "the stored state is the winner's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_operator_certificates_of_its_ca_may_call_the_operator_api() {
    let c = start();
    let mut engine = client(&c, &c.pki, "engine-se1").await.unwrap();
    let err = engine.list_engines(pb::Empty {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Another CA's operator certificate: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    controller::tls::init_pki(other.path(), &["127.0.0.1".into()], &[], &["admin".into()]).unwrap();
    std::fs::copy(c.pki.join("ca.pem"), other.path().join("ca.pem")).unwrap();
    let refused = match client(&c, other.path(), "operator-admin").await {
        Err(_) => true,
        Ok(mut op) => op.list_engines(pb::Empty {}).await.is_err(),
    };
    assert!(refused, "a certificate of another CA is refused");
    // No client certificate at all.
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(c.pki.join("ca.pem")).unwrap()),
    );
    let refused = match Channel::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => OperatorClient::new(ch)
            .list_engines(pb::Empty {})
            .await
            .is_err(),
    };
    assert!(refused, "a call without a client certificate is refused");
}
