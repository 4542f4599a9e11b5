#[test]
fn loads() {
    let obj = std::fs::read(std::env::var("LB_XDP_OBJECT").unwrap()).unwrap();
    let dir = std::path::Path::new("/sys/fs/bpf/lbsmoke");
    let r = lb_daemon::dataplane::Dataplane::load_with(&obj, dir, 4, 4096, 4096);
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = &r { let mut s: &dyn std::error::Error = e; loop { eprintln!("{s}"); match s.source() { Some(n) => s = n, None => break } } }
    r.unwrap();
}
