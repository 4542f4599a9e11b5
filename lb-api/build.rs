//! Compiles `proto/lb/v1/*.proto` with protox (pure Rust: no `protoc` on the build machine) and
//! generates the tonic clients and servers; the encoded descriptor set feeds gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/lb/v1/operator.proto", "proto/lb/v1/engine.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("lb_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
