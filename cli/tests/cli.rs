//! The `vmedge` binary as a user runs it: output and exit codes.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn vmedge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmedge"));
    c.current_dir(repo()).env_remove("RUST_LOG");
    c
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = vmedge()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn version_and_help() {
    let out = vmedge().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("vmedge {}", env!("CARGO_PKG_VERSION"))
    );
    let out = vmedge().arg("--help").output().unwrap();
    let help = text(&out.stdout);
    for word in ["up", "state", "firewall", "config", "--log-format"] {
        assert!(help.contains(word), "{help}");
    }
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn the_binary_does_not_load_libm() {
    // cli/src/math.rs defines the C math functions the binary calls, so that no process
    // maps glibc's libm.so (~450 kB resident).
    let out = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_vmedge"))
        .output()
        .unwrap();
    let libs = text(&out.stdout);
    assert!(libs.contains("libc.so"), "ldd: {libs}{}", text(&out.stderr));
    assert!(
        !libs.contains("libm.so"),
        "the binary calls a C math function cli/src/math.rs does not define (compare \
         `nm -D --undefined-only` of the binary with libm's symbols): {libs}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["bogus"][..],
        &["state"],
        &["state", "check"],
        &["--log-format", "xml", "state", "check", "x"],
    ] {
        let out = vmedge().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn state_check_good_and_bad() {
    let out = vmedge()
        .args(["state", "check", "examples/state.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "examples/state.json: ok: 9 VMs on 2 workers, 9 services, 3 users"
    );

    let broken = r#"{"vms": [
        {"id": "6f1c2d3e-0000-4000-8000-0000000000aa", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::2",
         "status": "running", "services": [{"name": "web", "port": 80}],
         "firewall": {"egress": {"rules": [{"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "80-"}]}}},
        {"id": "nope", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::2", "status": "running"}
    ]}"#;
    let out = run_with_stdin(&["state", "check", "-"], broken);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        concat!(
            "-: 3 errors:\n",
            "  vms[0].services[0].port: 80 is not allowed: service ports are 1024-65535 (privileged ports are rejected)\n",
            "  vms[0].firewall.egress.rules[0].ports: \"80-\" is not a port or a range\n",
            "  vms[1].id: \"nope\" is not a VM id (a UUID)\n",
        )
    );

    let out = run_with_stdin(&["state", "check", "-"], "{\"vms\": [\n  {,\n");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "-:2:4: not valid JSON: key must be a string\n"
    );

    let out = vmedge()
        .args(["state", "check", "/nonexistent/state.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/state.json: cannot read"));
}

#[test]
fn firewall_check_both_shapes() {
    let out = run_with_stdin(
        &["firewall", "check", "-", "--print"],
        r#"{"mode": "restricted", "ingress": [{"protocol": "tcp", "port_start": 8080, "port_end": 8090}]}"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["ingress"]["default"], "deny");
    assert_eq!(printed["ingress"]["rules"][0]["ports"], "8080-8090");
    assert_eq!(printed["ingress"]["rules"][0]["value"], "::/0");
    assert_eq!(printed["egress"]["default"], "allow");

    let out = run_with_stdin(
        &["firewall", "check", "-"],
        r#"{"egress": {"rules": [{"action": "allow", "kind": "fqdn", "value": "api.example.com"}]}, "dns": {"mode": "allow", "domains": ["*.other.org"]}}"#,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(r#"egress.rules[0].value: "api.example.com" is a dead rule"#)
    );
}

#[test]
fn config_check_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmedge.toml");
    std::fs::write(
        &file,
        "domain = \"example.dev\"\n[edge]\nwake_timeout = \"forever\"\n",
    )
    .unwrap();
    let out = vmedge()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("\"forever\" is not a duration"),
        "{err}"
    );
    let out = vmedge()
        .args(["config", "check", "examples/vmedge.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn up_prints_its_plan_and_stops_on_sigterm() {
    let mut child = vmedge()
        .args(["--log-format", "json", "up"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let done = line.starts_with("Ctrl-C stops.");
        seen.push(line);
        if done {
            break;
        }
    }
    let plan = seen.join("\n");
    assert!(plan.contains("config examples/vmedge.toml"), "{plan}");
    assert!(plan.contains("generation 1: 9 VMs, 3 users"), "{plan}");
    assert!(plan.contains("http 127.0.0.1:8080 [::1]:8080"), "{plan}");
    assert!(
        plan.contains(
            "http://web--0000000000004000800000000000de00.proxy.localhost:8080/ -> [::1]:8000"
        ),
        "{plan}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let logs = text(&out.stderr);
    assert!(
        logs.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "JSON logs: {logs}"
    );
    assert!(logs.contains("shutting down"), "{logs}");
}

#[test]
fn up_refuses_a_broken_state_with_every_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("state.json"),
        r#"{"vms": [{"id": "x"}], "extra": 1}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("vmedge.toml"),
        "registry = \"file:state.json\"\n",
    )
    .unwrap();
    let out = vmedge()
        .args(["up", "--config"])
        .arg(dir.path().join("vmedge.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("6 errors")
            && err.contains("extra: unknown field")
            && err.contains("vms[0].status: is required"),
        "{err}"
    );
}
