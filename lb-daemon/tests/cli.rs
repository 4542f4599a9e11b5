//! The daemon binary's behaviour on configuration errors (no root needed: it exits before
//! touching the kernel).

use std::process::Command;

fn check(config_text: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!(
        "lb-cli-{}-{}",
        std::process::id(),
        config_text.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lb-daemon"))
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const EXAMPLE: &str = include_str!("../../deploy/lb.example.toml");

#[test]
fn example_config_passes_check() {
    let (code, stderr) = check(EXAMPLE);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bad_field_exits_2_naming_field_and_reason() {
    let (code, stderr) = check(&EXAMPLE.replacen("port = 80\n", "port = 0\n", 1));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("virtual_services[0].port") && stderr.contains("must not be 0"),
        "{stderr}"
    );

    let (code, stderr) = check(&EXAMPLE.replace(
        "engines = [ { id = 1, weight = 1 }, { id = 2, weight = 1 } ]",
        "engines = [ { id = 1 }, { id = 9 } ]",
    ));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("virtual_services[0].engines[1].id"),
        "{stderr}"
    );
}

#[test]
fn unknown_field_and_syntax_errors_exit_2() {
    let (code, stderr) =
        check(&EXAMPLE.replace("engine_id = 1", "engine_id = 1\nengine_name = \"x\""));
    assert_eq!(code, 2);
    assert!(stderr.contains("engine_name"), "{stderr}");
    let (code, _) = check("[daemon\n");
    assert_eq!(code, 2);
}

#[test]
fn missing_file_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-daemon"))
        .args(["--check", "--config", "/nonexistent/lb.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lb.toml"));
}
