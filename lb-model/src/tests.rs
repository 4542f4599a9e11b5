use super::*;

const EXAMPLE: &str = include_str!("../../deploy/lb.example.toml");

/// A small valid configuration that the tests below break one field at a time.
const BASE: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1
tunnel_source_v4 = "192.0.2.1"
tunnel_source_v6 = "2001:db8::1"

[[engines]]
id = 1

[[engines]]
id = 2
mac = "02:00:00:00:00:02"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
mode = "tunnel"
address_v4 = "192.0.2.3"
address_v6 = "2001:db8::3"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]

[[virtual_services]]
id = 1
name = "dns"
vip = "2001:db8:100::53"
port = 53
protocol = "udp"
primary = 2
engines = [ { id = 2, weight = 3 } ]
"#;

fn base() -> Config {
    Config::parse(BASE).expect("BASE is valid")
}

/// Asserts that `config` fails validation on `field`, with a message containing `reason`.
#[track_caller]
fn rejects(config: &Config, field: &str, reason: &str) {
    let err = config.validate().expect_err("config should be rejected");
    assert_eq!(err.field(), Some(field), "wrong field in: {err}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
    assert!(msg.contains(reason), "{msg:?} does not contain {reason:?}");
}

#[test]
fn example_file_parses() {
    let c = Config::parse(EXAMPLE).unwrap();
    assert_eq!(c.daemon.interface, "eth0");
    assert_eq!(c.daemon.engine_id, 1);
    assert_eq!(c.daemon.xdp_mode, XdpMode::Native);
    assert_eq!(c.daemon.pin_dir, Path::new("/sys/fs/bpf/lb"));
    assert_eq!(c.daemon.metrics_listen, "127.0.0.1:9100".parse().unwrap());
    assert_eq!(c.daemon.max_virtual_services, 64);
    assert_eq!(c.daemon.conn_table_size, 1_048_576);
    assert_eq!(c.daemon.persist_table_size, 262_144);
    assert_eq!(c.engines.len(), 2);
    let e2 = c.engine(2).unwrap();
    assert_eq!(e2.mac, Some(MacAddr([2, 0, 0, 0, 0, 2])));
    assert_eq!(e2.mode, EngineMode::L2);
    assert_eq!(e2.state, EngineState::Active);
    assert!(c.engine(3).is_none());
    assert_eq!(c.local_engine().unwrap().id, 1);
    let vs = &c.virtual_services[0];
    assert_eq!(vs.name, "web");
    assert_eq!(vs.vip, "10.100.0.10".parse::<IpAddr>().unwrap());
    assert_eq!((vs.port, vs.protocol), (80, Protocol::Tcp));
    assert!(vs.steers_here(1));
    assert!(!vs.steers_here(2));
    assert_eq!(
        vs.engines,
        [Member { id: 1, weight: 1 }, Member { id: 2, weight: 1 }]
    );
}

#[test]
fn defaults_applied() {
    let c = Config::parse(
        r#"
[daemon]
interface = "eth0"
engine_id = 7
[[engines]]
id = 7
[[engines]]
id = 8
mac = "02:00:00:00:00:08"
[[virtual_services]]
id = 0
name = "a"
vip = "10.0.0.1"
port = 443
protocol = "tcp"
primary = 7
engines = [ { id = 8 } ]
"#,
    )
    .unwrap();
    let d = &c.daemon;
    assert_eq!(d.xdp_mode, XdpMode::Native);
    assert_eq!(d.pin_dir, PathBuf::from("/sys/fs/bpf/lb"));
    assert_eq!(d.metrics_listen, SocketAddr::from(([127, 0, 0, 1], 9100)));
    assert_eq!(d.max_virtual_services, DEFAULT_MAX_VS);
    assert_eq!(d.conn_table_size, DEFAULT_CONN_ENTRIES);
    assert_eq!(d.persist_table_size, DEFAULT_PERSIST_ENTRIES);
    assert_eq!(d.tunnel_source_v4, None);
    assert_eq!(d.tunnel_source_v6, None);
    let e = c.engine(8).unwrap();
    assert_eq!((e.mode, e.state), (EngineMode::L2, EngineState::Active));
    assert_eq!(
        (e.interface.as_deref(), e.address_v4, e.address_v6),
        (None, None, None)
    );
    let vs = &c.virtual_services[0];
    assert_eq!(vs.persistence_timeout_s, 0);
    assert_eq!(vs.engines[0].weight, 1);
}

#[test]
fn no_virtual_services_is_valid() {
    let c = Config::parse("[daemon]\ninterface = \"lo\"\nengine_id = 0\n[[engines]]\nid = 0\n")
        .unwrap();
    assert!(c.virtual_services.is_empty());
}

#[test]
fn enums_parse() {
    let text = BASE
        .replace("engine_id = 1\n", "engine_id = 1\nxdp_mode = \"generic\"\n")
        .replace("id = 2\nmac", "id = 2\nstate = \"draining\"\nmac");
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.daemon.xdp_mode, XdpMode::Generic);
    assert_eq!(c.engine(2).unwrap().state, EngineState::Draining);
    assert_eq!(c.engine(3).unwrap().mode, EngineMode::Tunnel);
    assert_eq!(c.virtual_services[1].protocol, Protocol::Udp);
    assert_eq!(Protocol::Udp.number(), lb_common::PROTO_UDP);
    assert_eq!(EngineState::Down.code(), lb_common::ENGINE_DOWN);

    let err =
        Config::parse(&BASE.replace("protocol = \"udp\"", "protocol = \"sctp\"")).unwrap_err();
    assert!(matches!(err, ConfigError::Toml(_)), "{err}");
    assert!(err.to_string().contains("sctp"), "{err}");
}

#[test]
fn serialize_round_trips() {
    for text in [BASE, EXAMPLE] {
        let c = Config::parse(text).unwrap();
        let out = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&out).unwrap(), c, "{out}");
    }
}

#[test]
fn load_reads_files_and_names_missing_ones() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lb.example.toml");
    assert_eq!(
        Config::load(&path).unwrap(),
        Config::parse(EXAMPLE).unwrap()
    );
    let err = Config::load(Path::new("/nonexistent/lb.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/lb.toml"), "{err}");
}

#[test]
fn unknown_fields_rejected() {
    for (from, to, key) in [
        ("engine_id = 1\n", "engine_id = 1\nbogus = 1\n", "bogus"),
        ("id = 2\nmac", "id = 2\nweight = 5\nmac", "weight"),
        ("name = \"web\"", "name = \"web\"\nvips = []", "vips"),
        ("{ id = 2, weight = 3 }", "{ id = 2, wieght = 3 }", "wieght"),
        ("[daemon]", "[extra]\na = 1\n[daemon]", "extra"),
    ] {
        let text = BASE.replacen(from, to, 1);
        assert_ne!(text, BASE);
        let err = Config::parse(&text).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("unknown field") && msg.contains(key), "{msg}");
        assert!(msg.contains("line"), "toml's message names the line: {msg}");
    }
}

#[test]
fn syntax_and_type_errors_keep_toml_message() {
    let err = Config::parse(&BASE.replace("port = 80", "port = \"80\"")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Toml(_)));
    assert!(msg.contains("line") && msg.contains("port"), "{msg}");

    let err = Config::parse(&BASE.replace("port = 80", "port = 70000")).unwrap_err();
    assert!(matches!(err, ConfigError::Toml(_)), "{err}");

    let err = Config::parse("[daemon\n").unwrap_err();
    assert!(matches!(err, ConfigError::Toml(_)));

    let err = Config::parse(&BASE.replace("interface = \"eth0\"\n", "")).unwrap_err();
    assert!(
        err.to_string().contains("missing field `interface`"),
        "{err}"
    );
}

#[test]
fn mac_parse_and_display() {
    let m: MacAddr = "02:AB:cd:00:0f:ff".parse().unwrap();
    assert_eq!(m, MacAddr([0x02, 0xab, 0xcd, 0x00, 0x0f, 0xff]));
    assert_eq!(m.to_string(), "02:ab:cd:00:0f:ff");
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "02:00:00:00:00:0g",
        "2:00:00:00:00:00",
        "02-00-00-00-00-00",
        "02:00:00:00:00:+1",
        "02:00:00:00:00:00:",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
    }
    let err = Config::parse(&BASE.replace("02:00:00:00:00:02", "02:00:00:00:02")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("invalid MAC address \"02:00:00:00:02\""),
        "{msg}"
    );
    assert!(msg.contains("line"), "{msg}");
}

// ---- [daemon] ----

#[test]
fn daemon_interface_empty() {
    let mut c = base();
    c.daemon.interface = String::new();
    rejects(&c, "daemon.interface", "must not be empty");
}

#[test]
fn daemon_interface_too_long() {
    let mut c = base();
    c.daemon.interface = "a".repeat(15);
    c.validate().unwrap();
    c.daemon.interface = "a".repeat(16);
    rejects(&c, "daemon.interface", "at most 15");
}

#[test]
fn daemon_interface_bad_characters() {
    let mut c = base();
    c.daemon.interface = "eth/0".into();
    rejects(&c, "daemon.interface", "not a valid interface name");
}

#[test]
fn max_virtual_services_range() {
    let mut c = base();
    c.daemon.max_virtual_services = 0;
    rejects(
        &c,
        "daemon.max_virtual_services",
        "0 is out of range 1..=4096",
    );
    c.daemon.max_virtual_services = 4097;
    rejects(
        &c,
        "daemon.max_virtual_services",
        "4097 is out of range 1..=4096",
    );
    c.daemon.max_virtual_services = 4096;
    c.validate().unwrap();
}

#[test]
fn table_sizes_minimum() {
    let mut c = base();
    c.daemon.conn_table_size = 1023;
    rejects(&c, "daemon.conn_table_size", "1023 is less than 1024");
    c.daemon.conn_table_size = 1024;
    c.daemon.persist_table_size = 100;
    rejects(&c, "daemon.persist_table_size", "100 is less than 1024");
    c.daemon.persist_table_size = 1024;
    c.validate().unwrap();
}

#[test]
fn tunnel_sources_must_be_unicast() {
    let mut c = base();
    c.daemon.tunnel_source_v4 = Some(Ipv4Addr::UNSPECIFIED);
    rejects(&c, "daemon.tunnel_source_v4", "unspecified");
    c.daemon.tunnel_source_v4 = Some("192.0.2.1".parse().unwrap());
    c.daemon.tunnel_source_v6 = Some("ff02::1".parse().unwrap());
    rejects(&c, "daemon.tunnel_source_v6", "multicast");
}

#[test]
fn daemon_engine_id_must_be_defined() {
    let mut c = base();
    c.daemon.engine_id = 9;
    // Engine 1 is no longer this host and has no MAC: that is found first (file order).
    c.engines[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
    rejects(
        &c,
        "daemon.engine_id",
        "engine 9 is not defined in [[engines]]",
    );
}

// ---- [[engines]] ----

#[test]
fn engine_id_out_of_range() {
    let mut c = base();
    c.engines[1].id = 300;
    rejects(&c, "engines[1].id", "300 is out of range 0..=255");
    c.engines[1].id = 256;
    rejects(&c, "engines[1].id", "256 is out of range 0..=255");
}

#[test]
fn engine_ids_unique() {
    let mut c = base();
    c.engines[2].id = 2;
    rejects(
        &c,
        "engines[2].id",
        "engine 2 is already defined by engines[1]",
    );
}

#[test]
fn engine_max_id_accepted() {
    let mut c = base();
    c.engines[1].id = 255;
    c.virtual_services[1].primary = 255;
    c.virtual_services[0].engines[1].id = 255;
    c.virtual_services[1].engines[0].id = 255;
    c.validate().unwrap();
}

#[test]
fn non_self_engine_needs_mac() {
    let mut c = base();
    c.engines[1].mac = None;
    rejects(&c, "engines[1].mac", "engine 2 is not this host");
    // This host needs none.
    let mut c = base();
    c.engines[0].mac = None;
    c.validate().unwrap();
}

#[test]
fn engine_interface_checked() {
    let mut c = base();
    c.engines[1].interface = Some(String::new());
    rejects(&c, "engines[1].interface", "must not be empty");
    c.engines[1].interface = Some("veth-too-long-name".into());
    rejects(&c, "engines[1].interface", "at most 15");
    c.engines[1].interface = Some("eth1".into());
    c.validate().unwrap();
}

#[test]
fn tunnel_engine_needs_an_address() {
    let mut c = base();
    c.engines[2].address_v4 = None;
    c.engines[2].address_v6 = None;
    rejects(
        &c,
        "engines[2].address_v4",
        "needs address_v4 and/or address_v6",
    );
    // Either family alone is enough.
    c.engines[2].address_v6 = Some("2001:db8::3".parse().unwrap());
    c.validate().unwrap();
    c.engines[2].address_v6 = None;
    c.engines[2].address_v4 = Some("192.0.2.3".parse().unwrap());
    c.validate().unwrap();
}

#[test]
fn tunnel_mtu_is_checked() {
    let mut c = base();
    c.engines[2].address_v6 = None;
    c.engines[2].mtu = Some(575);
    rejects(&c, "engines[2].mtu", "575 is below 576");
    c.engines[2].mtu = Some(576);
    c.validate().unwrap();
    c.engines[2].address_v6 = Some("2001:db8::3".parse().unwrap());
    rejects(&c, "engines[2].mtu", "below 1320");
    c.engines[2].mtu = Some(1320);
    c.validate().unwrap();
    let mut c = base();
    c.engines[1].mtu = Some(1400);
    rejects(&c, "engines[1].mtu", "only tunnel-mode engines");
}

#[test]
fn tunnel_engine_address_must_be_unicast() {
    let mut c = base();
    c.engines[2].address_v4 = Some(Ipv4Addr::BROADCAST);
    rejects(&c, "engines[2].address_v4", "broadcast");
    let mut c = base();
    c.engines[2].address_v6 = Some(Ipv6Addr::UNSPECIFIED);
    rejects(&c, "engines[2].address_v6", "unspecified");
}

#[test]
fn tunnel_v4_needs_tunnel_source_v4() {
    let mut c = base();
    c.daemon.tunnel_source_v4 = None;
    rejects(
        &c,
        "daemon.tunnel_source_v4",
        "engine 3 (engines[2]) tunnels over IPv4",
    );
    // Not needed when no engine tunnels over IPv4.
    c.engines[2].address_v4 = None;
    c.validate().unwrap();
}

#[test]
fn tunnel_v6_needs_tunnel_source_v6() {
    let mut c = base();
    c.daemon.tunnel_source_v6 = None;
    rejects(
        &c,
        "daemon.tunnel_source_v6",
        "engine 3 (engines[2]) tunnels over IPv6",
    );
    c.engines[2].address_v6 = None;
    c.validate().unwrap();
}

#[test]
fn l2_engines_need_no_tunnel_source() {
    let mut c = base();
    c.daemon.tunnel_source_v4 = None;
    c.daemon.tunnel_source_v6 = None;
    c.engines[2].mode = EngineMode::L2;
    c.validate().unwrap();
}

// ---- [[virtual_services]] ----

#[test]
fn vs_id_below_max_virtual_services() {
    let mut c = base();
    c.virtual_services[1].id = 64;
    rejects(
        &c,
        "virtual_services[1].id",
        "64 is out of range 0..=63 (daemon.max_virtual_services = 64)",
    );
    c.daemon.max_virtual_services = 65;
    c.validate().unwrap();
}

#[test]
fn vs_ids_unique() {
    let mut c = base();
    c.virtual_services[1].id = 0;
    rejects(
        &c,
        "virtual_services[1].id",
        "virtual service id 0 is already used by virtual_services[0]",
    );
}

#[test]
fn vs_name_non_empty() {
    let mut c = base();
    c.virtual_services[1].name = " ".into();
    rejects(&c, "virtual_services[1].name", "must not be empty");
}

#[test]
fn vs_names_unique() {
    let mut c = base();
    c.virtual_services[1].name = "web".into();
    rejects(
        &c,
        "virtual_services[1].name",
        "\"web\" is already used by virtual_services[0]",
    );
}

#[test]
fn vs_port_non_zero() {
    let mut c = base();
    c.virtual_services[0].port = 0;
    rejects(&c, "virtual_services[0].port", "must not be 0");
}

#[test]
fn vs_vip_must_be_unicast() {
    for (vip, why) in [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ] {
        let mut c = base();
        c.virtual_services[1].vip = vip.parse().unwrap();
        rejects(&c, "virtual_services[1].vip", why);
    }
}

#[test]
fn vs_duplicate_vip_port_protocol() {
    let mut c = base();
    c.virtual_services.push(VirtualServiceConfig {
        id: 2,
        name: "web2".into(),
        ..c.virtual_services[0].clone()
    });
    rejects(
        &c,
        "virtual_services[2].vip",
        "10.100.0.10 port 80 tcp is already served by virtual_services[0] (\"web\")",
    );
    // Another port, or another protocol, is another virtual service.
    c.virtual_services[2].port = 8080;
    c.validate().unwrap();
    c.virtual_services[2].port = 80;
    c.virtual_services[2].protocol = Protocol::Udp;
    c.validate().unwrap();
}

#[test]
fn vs_primary_must_be_defined() {
    let mut c = base();
    c.virtual_services[1].primary = 9;
    rejects(
        &c,
        "virtual_services[1].primary",
        "engine 9 is not defined in [[engines]]",
    );
}

#[test]
fn vs_engines_non_empty() {
    let mut c = base();
    c.virtual_services[1].engines.clear();
    rejects(&c, "virtual_services[1].engines", "at least one engine");
}

#[test]
fn vs_member_must_be_defined() {
    let mut c = base();
    c.virtual_services[0].engines[1].id = 9;
    rejects(
        &c,
        "virtual_services[0].engines[1].id",
        "engine 9 is not defined in [[engines]]",
    );
}

#[test]
fn vs_member_listed_once() {
    let mut c = base();
    c.virtual_services[0].engines[2].id = 1;
    rejects(
        &c,
        "virtual_services[0].engines[2].id",
        "engine 1 is listed twice",
    );
}

#[test]
fn vs_member_weight_range() {
    let mut c = base();
    c.virtual_services[0].engines[1].weight = 65536;
    rejects(
        &c,
        "virtual_services[0].engines[1].weight",
        "65536 is out of range 0..=65535",
    );
    c.virtual_services[0].engines[1].weight = 65535;
    c.validate().unwrap();
    c.virtual_services[0].engines[1].weight = 0;
    c.validate().unwrap();
}

#[test]
fn vs_needs_a_positive_weight() {
    let mut c = base();
    for m in &mut c.virtual_services[0].engines {
        m.weight = 0;
    }
    rejects(
        &c,
        "virtual_services[0].engines",
        "at least one engine needs a weight above 0",
    );
}

#[test]
fn first_error_in_file_order() {
    let mut c = base();
    c.virtual_services[1].port = 0;
    c.virtual_services[0].port = 0;
    c.engines[1].mac = None;
    rejects(&c, "engines[1].mac", "");
    c.engines[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 2]));
    rejects(&c, "virtual_services[0].port", "must not be 0");
}

#[test]
fn parse_reports_validation_errors() {
    let err = Config::parse(&BASE.replace("port = 53", "port = 0")).unwrap_err();
    assert_eq!(err.to_string(), "virtual_services[1].port: must not be 0");
}

// ---- [proxy] and [[pools]] ----

fn with_pool() -> Config {
    let mut c = base();
    c.pools.push(PoolConfig {
        name: "web".into(),
        algorithm: Algorithm::RoundRobin,
        backends: vec![
            BackendConfig {
                address: "10.1.0.1".parse().unwrap(),
                port: 80,
                weight: 1,
                enabled: true,
            },
            BackendConfig {
                address: "10.1.0.2".parse().unwrap(),
                port: 80,
                weight: 1,
                enabled: true,
            },
        ],
        health_check: Some(HealthCheckConfig {
            kind: HealthCheckKind::Http,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            port: None,
            http_path: "/".into(),
            http_host: None,
            expected_status: 200,
        }),
    });
    c.virtual_services[0].pool = Some("web".into());
    c
}

#[test]
fn example_pool_and_proxy_parse() {
    let c = Config::parse(EXAMPLE).unwrap();
    let pool = c.pool("web").unwrap();
    assert_eq!(pool.algorithm, Algorithm::LeastConnections);
    assert_eq!(pool.backends.len(), 3);
    assert!(!pool.backends[2].enabled);
    assert_eq!(pool.health_check.as_ref().unwrap().http_path, "/health");
    assert_eq!(c.virtual_services[0].pool.as_deref(), Some("web"));
    assert_eq!(c.proxy.drain_timeout_s, 30);
}

#[test]
fn proxy_defaults() {
    let c = base();
    assert_eq!(c.proxy, ProxyConfig::default());
    assert_eq!(
        (
            c.proxy.connect_timeout_ms,
            c.proxy.idle_timeout_s,
            c.proxy.drain_timeout_s
        ),
        (3000, 300, 30)
    );
    assert_eq!(c.virtual_services[0].max_connections, 100_000);
    assert!(!c.virtual_services[0].draining);
    with_pool().validate().unwrap();
}

#[test]
fn thread_counts_default_to_the_cpus_and_are_bounded() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let mut c = with_pool();
    assert_eq!((c.daemon.worker_threads, c.daemon.proxy_threads), (0, 0));
    assert_eq!(c.daemon.runtime_threads(), cpus);
    assert_eq!(c.daemon.proxy_thread_count(), cpus);
    c.daemon.worker_threads = 3;
    c.daemon.proxy_threads = 5;
    assert_eq!(c.daemon.runtime_threads(), 3);
    assert_eq!(c.daemon.proxy_thread_count(), 5);
    c.validate().unwrap();
    c.daemon.worker_threads = 257;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("daemon.worker_threads"), "{e}");
    c.daemon.worker_threads = 0;
    c.daemon.proxy_threads = 257;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("daemon.proxy_threads"), "{e}");
}

#[test]
fn the_udp_buffer_is_4_mib_by_default_and_bounded() {
    let mut c = with_pool();
    assert_eq!(c.proxy.udp_buffer_bytes, 4 << 20);
    for bad in [(64 << 10) - 1, (256 << 20) + 1] {
        c.proxy.udp_buffer_bytes = bad;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("proxy.udp_buffer_bytes"), "{e}");
    }
    c.proxy.udp_buffer_bytes = 64 << 10;
    c.validate().unwrap();
}

#[test]
fn a_service_drain_timeout_is_within_1_to_3600_s() {
    let mut c = with_pool();
    c.virtual_services[0].drain_timeout_s = Some(45);
    c.validate().unwrap();
    for bad in [0, 3601] {
        c.virtual_services[0].drain_timeout_s = Some(bad);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("virtual_services[0].drain_timeout_s") && e.contains("outside 1–3600"),
            "{e}"
        );
    }
}

#[test]
fn unknown_pool_is_rejected() {
    let mut c = with_pool();
    c.virtual_services[0].pool = Some("nope".into());
    rejects(
        &c,
        "virtual_services[0].pool",
        "pool \"nope\" is not defined",
    );
}

#[test]
fn bad_backends_are_rejected() {
    let mut c = with_pool();
    c.pools[0].backends[1].port = 0;
    rejects(&c, "pools[0].backends[1].port", "must not be 0");
    let mut c = with_pool();
    c.pools[0].backends[0].address = "0.0.0.0".parse().unwrap();
    rejects(&c, "pools[0].backends[0].address", "unspecified");
    let mut c = with_pool();
    c.pools[0].backends[1].address = c.pools[0].backends[0].address;
    rejects(
        &c,
        "pools[0].backends[1].address",
        "already pools[0].backends[0]",
    );
    let mut c = with_pool();
    c.pools[0].backends.clear();
    rejects(&c, "pools[0].backends", "at least one backend");
    let mut c = with_pool();
    c.pools[0].backends[0].weight = 70_000;
    rejects(&c, "pools[0].backends[0].weight", "out of range");
}

#[test]
fn duplicate_pool_names_are_rejected() {
    let mut c = with_pool();
    let dup = c.pools[0].clone();
    c.pools.push(dup);
    rejects(&c, "pools[1].name", "already used by pools[0]");
}

#[test]
fn bad_health_checks_are_rejected() {
    type Case = (fn(&mut HealthCheckConfig), &'static str, &'static str);
    let cases: [Case; 6] = [
        (|h| h.interval_ms = 50, "interval_ms", "less than 100"),
        (|h| h.timeout_ms = 5000, "timeout_ms", "1..=interval_ms"),
        (|h| h.rise = 0, "rise", "out of range"),
        (|h| h.fall = 101, "fall", "out of range"),
        (
            |h| h.http_path = "health".into(),
            "http_path",
            "must start with /",
        ),
        (
            |h| h.expected_status = 42,
            "expected_status",
            "not an HTTP status",
        ),
    ];
    for (breaks, field, reason) in cases {
        let mut c = with_pool();
        breaks(c.pools[0].health_check.as_mut().unwrap());
        rejects(&c, &format!("pools[0].health_check.{field}"), reason);
    }
}

#[test]
fn bad_proxy_settings_are_rejected() {
    let mut c = with_pool();
    c.proxy.idle_timeout_s = 0;
    rejects(&c, "proxy.idle_timeout_s", "greater than 0");
    let mut c = with_pool();
    c.proxy.source_v4 = Some("255.255.255.255".parse().unwrap());
    rejects(&c, "proxy.source_v4", "broadcast");
    let mut c = with_pool();
    c.proxy.max_open_files = 10;
    rejects(&c, "proxy.max_open_files", "less than 1024");
}

#[test]
fn unknown_algorithm_is_a_parse_error() {
    let text = EXAMPLE.replace(
        "algorithm = \"least_connections\"",
        "algorithm = \"random\"",
    );
    let err = Config::parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("random") && err.contains("round_robin"),
        "{err}"
    );
}

#[test]
fn managed_files_hold_the_host_and_the_controller_only() {
    let managed = "[daemon]\ninterface = \"eth0\"\nengine_id = 3\n\n[controller]\naddress = \"https://10.0.0.5:7400\"\nname = \"se3\"\ntags = { zone = \"a\" }\n";
    let EngineFile::Managed(m) = EngineFile::parse(managed).unwrap() else {
        panic!("a [controller] section makes it managed");
    };
    assert_eq!(m.controller.name, "se3");
    assert_eq!(m.controller.heartbeat_interval_ms, 1000);
    assert_eq!(m.initial().engines.len(), 1);
    assert!(matches!(
        EngineFile::parse(BASE).unwrap(),
        EngineFile::Standalone(_)
    ));
    let with_vs = format!("{managed}\n[[virtual_services]]\nid = 0\n");
    let err = EngineFile::parse(&with_vs).unwrap_err();
    assert_eq!(err.field(), Some("virtual_services"), "{err}");
    let bad = managed.replace("https://10.0.0.5:7400", "10.0.0.5:7400");
    assert_eq!(
        EngineFile::parse(&bad).unwrap_err().field(),
        Some("controller.address")
    );
    let bad = managed.replace("engine_id = 3", "engine_id = 300");
    assert!(
        EngineFile::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("engines[0].id")
    );
}

#[test]
fn managed_example_file_parses() {
    let text = include_str!("../../deploy/lb.managed.example.toml");
    assert!(matches!(
        EngineFile::parse(text).unwrap(),
        EngineFile::Managed(_)
    ));
}

/// A minimal `[bgp]` section with one peer, everything else defaulted.
const BGP: &str = r#"
[bgp]
asn = 65001
router_id = "192.0.2.1"

[[bgp.peers]]
address = "192.0.2.254"
asn = 65000
"#;

fn with_bgp() -> Config {
    Config::parse(&format!("{BASE}{BGP}")).expect("BASE with BGP is valid")
}

/// `with_bgp()` with `change` applied to its `[bgp]` section.
fn bgp_with(change: impl FnOnce(&mut BgpConfig)) -> Config {
    let mut c = with_bgp();
    change(c.bgp.as_mut().unwrap());
    c
}

#[test]
fn a_minimal_bgp_section_parses_with_the_defaults() {
    let c = with_bgp();
    let b = c.bgp.as_ref().expect("[bgp] parsed");
    assert_eq!(b.asn, 65001);
    assert_eq!(b.router_id, Ipv4Addr::new(192, 0, 2, 1));
    assert_eq!(b.hold_time_s, 90);
    assert_eq!(b.min_backoff_ms, 500);
    assert_eq!(b.max_backoff_s, 30);
    assert!(b.communities.is_empty());
    assert_eq!(
        b.peers,
        [BgpPeerConfig {
            address: "192.0.2.254".parse().unwrap(),
            asn: 65000,
            port: 179,
            hold_time_s: None,
            bfd: None,
            next_hop_v4: None,
            next_hop_v6: None,
            password: None,
        }]
    );
    assert!(c.virtual_services.iter().all(|vs| vs.bgp.is_none()));
    assert!(base().bgp.is_none(), "no [bgp]: BGP is off");
    let out = toml::to_string(&c).unwrap();
    assert_eq!(Config::parse(&out).unwrap(), c, "{out}");
}

#[test]
fn a_full_bgp_section_parses() {
    let text = format!(
        "{BASE}{}",
        BGP.replace(
            "router_id = \"192.0.2.1\"\n",
            "router_id = \"192.0.2.1\"\nhold_time_s = 0\nmin_backoff_ms = 100\nmax_backoff_s = 5\ncommunities = [\"65001:10\", \"0:0\", \"65535:65535\"]\n",
        )
        .replace(
            "asn = 65000\n",
            "asn = 4200000000\nport = 1179\nhold_time_s = 3\nnext_hop_v4 = \"192.0.2.1\"\nnext_hop_v6 = \"2001:db8::1\"\n",
        )
    );
    let c = Config::parse(&text).unwrap();
    let b = c.bgp.unwrap();
    assert_eq!(
        (b.hold_time_s, b.min_backoff_ms, b.max_backoff_s),
        (0, 100, 5)
    );
    assert_eq!(b.communities.len(), 3);
    let p = &b.peers[0];
    assert_eq!(
        (p.asn, p.port, p.hold_time_s),
        (4_200_000_000, 1179, Some(3))
    );
    assert_eq!(p.next_hop_v4, Some(Ipv4Addr::new(192, 0, 2, 1)));
    assert_eq!(p.next_hop_v6, Some("2001:db8::1".parse().unwrap()));
}

#[test]
fn bgp_asn_0_and_as_trans_are_reserved() {
    for asn in [0, 23456, u32::from(AS_TRANS)] {
        rejects(&bgp_with(|b| b.asn = asn), "bgp.asn", "reserved");
    }
    bgp_with(|b| b.asn = 4_294_967_295).validate().unwrap();
}

#[test]
fn bgp_router_id_must_not_be_0() {
    let c = bgp_with(|b| b.router_id = Ipv4Addr::UNSPECIFIED);
    rejects(&c, "bgp.router_id", "0.0.0.0");
}

#[test]
fn bgp_hold_times_of_1_and_2_are_refused() {
    for h in [1, 2] {
        rejects(
            &bgp_with(|b| b.hold_time_s = h),
            "bgp.hold_time_s",
            "at least 3 s",
        );
        rejects(
            &bgp_with(|b| b.peers[0].hold_time_s = Some(h)),
            "bgp.peers[0].hold_time_s",
            "at least 3 s",
        );
    }
    for h in [0, 3, 65535] {
        bgp_with(|b| b.hold_time_s = h).validate().unwrap();
        bgp_with(|b| b.peers[0].hold_time_s = Some(h))
            .validate()
            .unwrap();
    }
}

#[test]
fn bgp_backoffs_are_checked() {
    rejects(
        &bgp_with(|b| b.min_backoff_ms = 0),
        "bgp.min_backoff_ms",
        "1–60000",
    );
    rejects(
        &bgp_with(|b| {
            b.min_backoff_ms = 5000;
            b.max_backoff_s = 4;
        }),
        "bgp.max_backoff_s",
        "not below min_backoff_ms",
    );
    bgp_with(|b| {
        b.min_backoff_ms = 5000;
        b.max_backoff_s = 5;
    })
    .validate()
    .unwrap();
}

#[test]
fn bad_bgp_communities_are_refused() {
    for bad in ["65536:1", "1:65536", "1:2:3", "x", "1", ":1", "-1:1"] {
        let c = bgp_with(|b| b.communities = vec!["65001:10".into(), bad.into()]);
        rejects(&c, "bgp.communities[1]", &format!("{bad:?}"));
    }
    bgp_with(|b| b.communities = vec!["65001:10".into(), "65535:0".into()])
        .validate()
        .unwrap();
}

#[test]
fn parse_community_packs_asn_and_value() {
    assert_eq!(parse_community("65001:10"), Some((65001 << 16) + 10));
    assert_eq!(parse_community("0:0"), Some(0));
    assert_eq!(parse_community("65535:65535"), Some(u32::MAX));
    assert_eq!(parse_community("65536:1"), None);
    assert_eq!(parse_community("1:2:3"), None);
    assert_eq!(parse_community("x"), None);
}

#[test]
fn bgp_needs_a_peer() {
    rejects(&bgp_with(|b| b.peers.clear()), "bgp.peers", "no peer");
}

#[test]
fn bgp_peers_are_checked() {
    let c = bgp_with(|b| {
        let again = b.peers[0].clone();
        b.peers.push(again);
    });
    rejects(&c, "bgp.peers[1].address", "listed twice");
    rejects(
        &bgp_with(|b| b.peers[0].asn = 0),
        "bgp.peers[0].asn",
        "reserved",
    );
    rejects(
        &bgp_with(|b| b.peers[0].port = 0),
        "bgp.peers[0].port",
        "not a port",
    );
    for addr in ["224.0.0.5", "ff02::5"] {
        rejects(
            &bgp_with(|b| b.peers[0].address = addr.parse().unwrap()),
            "bgp.peers[0].address",
            "multicast",
        );
    }
    rejects(
        &bgp_with(|b| b.peers[0].address = "0.0.0.0".parse().unwrap()),
        "bgp.peers[0].address",
        "unspecified",
    );
}

#[test]
fn a_bgp_service_needs_a_bgp_section() {
    let vs_bgp = BASE.replacen(
        "engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]\n",
        "engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]\nbgp = { med = 10 }\n",
        1,
    );
    assert_ne!(vs_bgp, BASE);
    let c = Config::parse(&format!("{vs_bgp}{BGP}")).unwrap();
    assert_eq!(
        c.virtual_services[0].bgp,
        Some(VsBgpConfig {
            med: Some(10),
            local_pref: None,
        })
    );
    let err = Config::parse(&vs_bgp).unwrap_err();
    assert_eq!(err.field(), Some("virtual_services[0].bgp"), "{err}");
    assert!(err.to_string().contains("no [bgp] section"), "{err}");
    let mut c = base();
    c.virtual_services[1].bgp = Some(VsBgpConfig::default());
    rejects(&c, "virtual_services[1].bgp", "dns");
}

#[test]
fn unknown_bgp_fields_are_refused() {
    for (from, to, key) in [
        ("asn = 65001\n", "asn = 65001\nlocal_as = 1\n", "local_as"),
        ("asn = 65000\n", "asn = 65000\nmed = 1\n", "med"),
    ] {
        let text = format!("{BASE}{}", BGP.replacen(from, to, 1));
        let err = Config::parse(&text).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("unknown field") && msg.contains(key), "{msg}");
    }
    let text = BASE.replacen(
        "engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]\n",
        "engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]\nbgp = { metric = 10 }\n",
        1,
    );
    let err = Config::parse(&format!("{text}{BGP}")).unwrap_err();
    assert!(
        matches!(err, ConfigError::Toml(_)) && err.to_string().contains("metric"),
        "{err}"
    );
}

#[test]
fn bgp_communities_are_bounded() {
    let list: Vec<String> = (0..65).map(|i| format!("\"65001:{i}\"")).collect();
    let text = format!(
        "{BASE}\n[bgp]\nasn = 65001\nrouter_id = \"10.0.0.1\"\ncommunities = [{}]\n[[bgp.peers]]\naddress = \"10.0.0.254\"\nasn = 65000\n",
        list.join(", ")
    );
    let e = toml::from_str::<Config>(&text)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bgp.communities") && e.contains("at most 64"),
        "{e}"
    );
}

#[test]
fn bfd_timers_default_and_are_bounded() {
    let with = |bfd: &str| {
        format!(
            "{BASE}\n[bgp]\nasn = 65001\nrouter_id = \"10.0.0.1\"\n[[bgp.peers]]\naddress = \"10.0.0.254\"\nasn = 65000\nbfd = {{ {bfd} }}\n"
        )
    };
    let c = toml::from_str::<Config>(&with("")).unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.bgp.unwrap().peers[0].bfd,
        Some(crate::BfdConfig {
            min_tx_ms: 100,
            min_rx_ms: 100,
            multiplier: 3
        })
    );
    for (bad, field) in [
        ("min_tx_ms = 5", "bgp.peers[0].bfd.min_tx_ms"),
        ("min_rx_ms = 20000", "bgp.peers[0].bfd.min_rx_ms"),
        ("multiplier = 0", "bgp.peers[0].bfd.multiplier"),
    ] {
        let e = toml::from_str::<Config>(&with(bad))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn the_examples_bgp_section_is_valid_when_uncommented() {
    let at = EXAMPLE.find("# [bgp]").expect("the example shows [bgp]");
    let bgp: String = EXAMPLE[at..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let text = format!("{}\n{bgp}\n", &EXAMPLE[..at]);
    let c = Config::parse(&text).unwrap();
    let b = c.bgp.as_ref().expect("[bgp] parsed");
    assert_eq!(b.peers.len(), 1);
    assert!(b.peers[0].bfd.is_some());
}

#[test]
fn a_pushed_bgp_section_without_router_id_takes_the_engines_own_address() {
    let mut desired = with_bgp().desired();
    desired.bgp.as_mut().unwrap().router_id = Ipv4Addr::UNSPECIFIED;
    let mut engine3 = desired.clone();
    engine3.engines.retain(|e| e.id == 3);
    for vs in &mut engine3.virtual_services {
        vs.primary = 3;
        vs.engines = vec![Member { id: 3, weight: 1 }];
    }
    let mut daemon = base().daemon;
    daemon.engine_id = 3;
    let c = Config::from_parts(daemon, engine3).expect("engine 3 has an address");
    assert_eq!(
        c.bgp.unwrap().router_id,
        "192.0.2.3".parse::<Ipv4Addr>().unwrap()
    );
    // Engine 1 has no address_v4: nothing to take it from.
    let err = Config::from_parts(base().daemon, desired).expect_err("no address");
    assert_eq!(err.field(), Some("bgp.router_id"), "{err}");
    assert!(err.to_string().contains("no address_v4"), "{err}");
    // A router id that is set stays.
    let c = Config::from_parts(base().daemon, with_bgp().desired()).unwrap();
    assert_eq!(
        c.bgp.unwrap().router_id,
        "192.0.2.1".parse::<Ipv4Addr>().unwrap()
    );
}

#[test]
fn a_tcp_md5_password_is_1_to_80_bytes_and_never_printed() {
    let c = Config::parse(&format!("{BASE}{BGP}password = \"s3cret\"\n")).unwrap();
    let p = &c.bgp.as_ref().unwrap().peers[0];
    assert_eq!(p.password, Some(Password("s3cret".into())));
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "redacted in debug output"
    );
    for bad in [String::new(), "k".repeat(81)] {
        let c = bgp_with(|b| b.peers[0].password = Some(Password(bad)));
        rejects(&c, "bgp.peers[0].password", "1–80");
    }
    bgp_with(|b| b.peers[0].password = Some(Password("k".repeat(80))))
        .validate()
        .unwrap();
}
