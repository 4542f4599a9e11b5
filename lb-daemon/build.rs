//! Embeds the XDP object (`target/bpf/lb-xdp.o`, or `$LB_XDP_OBJECT`) into the daemon, so a
//! deployment is one binary. Without it the daemon still builds and asks for `--bpf-object`.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("LB_XDP_OBJECT")
        .map_or_else(|| manifest.join("../target/bpf/lb-xdp.o"), PathBuf::from);
    println!("cargo::rerun-if-env-changed=LB_XDP_OBJECT");
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("lb-xdp.o");
    let bytes = fs::read(&object).unwrap_or_else(|_| {
        println!("cargo::warning=no XDP object at {}: run `cargo xtask build-ebpf` first, or pass --bpf-object at run time", object.display());
        Vec::new()
    });
    fs::write(&out, bytes).expect("writing OUT_DIR/lb-xdp.o");
}
