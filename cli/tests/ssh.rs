//! `vmedge ssh-gateway` as an operator runs it, inside a lab's worker namespace, in front
//! of OpenSSH's sshd in VM namespaces on IPv6, used with the real OpenSSH client (ssh, scp,
//! sftp).
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmedge_tests::edge::{backend, http_get, wake_hook, Process};
use vmedge_tests::gate::metric;
use vmedge_tests::ssh::{
    client_options, gateway, keygen, public_line, shell, ssh, KeyPair, Sshd, SshdOptions,
};
use vmedge_tests::{Lab, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_vmedge");
const LISTEN: &str = "127.0.0.1:2222";
const ADMIN: &str = "127.0.0.1:9181";
const HOOK: &str = "127.0.0.1:9000";

fn vm_id(i: usize) -> String {
    format!("6f1c2d3e-0000-4000-8000-0000000000{i:02x}")
}

const STOPPED: usize = 0x10;
const WRONG_HOST_KEY: usize = 0x11;
const HUNG: usize = 0x12;
const UNKNOWN: usize = 0x7f;

/// Users' keys: u-1 (org o) has one of each type; u-2 (org other) one; `stranger` is in
/// no user.
struct Keys {
    ed25519: KeyPair,
    rsa: KeyPair,
    ecdsa: [KeyPair; 3],
    other_org: KeyPair,
    stranger: KeyPair,
}

/// A lab: VM 0 (org o, host key listed), VM 1 (org o, host certificate), VM 2 (org other),
/// plus VMs without sshd: stopped, one listing the wrong host key, one whose port 22
/// accepts and never speaks.
struct SshLab {
    lab: Lab,
    dir: tempfile::TempDir,
    keys: Keys,
    sshd: Vec<Sshd>,
    hung_addr: Ipv6Addr,
    wrong_key_addr: Ipv6Addr,
    _hung: Process,
    gateway: Option<Process>,
}

impl SshLab {
    fn start(vm1_status: &str) -> SshLab {
        let lab = Lab::new(3);
        let dir = tempfile::tempdir().unwrap();
        let d = &dir.path().to_path_buf();
        let keys = Keys {
            ed25519: keygen(d, "id_ed25519", "ed25519", None),
            rsa: keygen(d, "id_rsa", "rsa", Some(3072)),
            ecdsa: [256, 384, 521].map(|b| keygen(d, &format!("id_ecdsa{b}"), "ecdsa", Some(b))),
            other_org: keygen(d, "id_other", "ed25519", None),
            stranger: keygen(d, "id_stranger", "ed25519", None),
        };
        // The gateway's user CA, made here so the VMs' sshd can trust it before the gateway
        // starts (the gateway loads it from its state_dir).
        std::fs::create_dir_all(d.join("state")).unwrap();
        let user_ca = keygen(&d.join("state"), "ssh_user_ca_key", "ed25519", None);
        let host_ca = keygen(d, "host_ca", "ed25519", None);

        // VM 0's sshd also answers on a second address, where the state puts a VM that
        // lists the wrong host key.
        let [a, b, c, l, ..] = lab.vms[0].ipv6.segments();
        let wrong_key_addr = Ipv6Addr::new(a, b, c, l, 0, 0, 0, 4);
        lab.vms[0].ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{wrong_key_addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let mut sshd = Vec::new();
        let vm1 = vm_id(1);
        for (i, v) in lab.vms.iter().enumerate() {
            let options = SshdOptions {
                user_ca: Some(&user_ca.public),
                host_cert: (i == 1).then_some((&host_ca, vm1.as_str())),
                ..SshdOptions::default()
            };
            let addrs = if i == 0 {
                vec![v.ipv6, wrong_key_addr]
            } else {
                vec![v.ipv6]
            };
            sshd.push(Sshd::start(
                &v.ns,
                &d.join(format!("vm{i}")),
                &addrs,
                options,
            ));
        }
        // Port 22 that accepts and never answers, on a second address of VM 2.
        let [a, b, c, l, ..] = lab.vms[2].ipv6.segments();
        let hung_addr = Ipv6Addr::new(a, b, c, l, 0, 0, 0, 3);
        lab.vms[2].ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{hung_addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let hung = lab.vms[2]
            .ns
            .command("python3")
            .args([
                "-c",
                &format!(
                    "import socket,time\ns=socket.socket(socket.AF_INET6)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                     s.bind(('{hung_addr}',22))\ns.listen(64)\nc=[]\nwhile True: c.append(s.accept())\n"
                ),
            ])
            .spawn()
            .unwrap();
        let hung = Process::new(hung, "hung listener");
        vmedge_tests::edge::wait_listening(
            &lab.vms[2].ns,
            SocketAddr::from((hung_addr, 22)),
            "hung listener",
        );

        let mut t = SshLab {
            gateway: None,
            lab,
            dir,
            keys,
            sshd,
            hung_addr,
            wrong_key_addr,
            _hung: hung,
        };
        t.write_state(vm1_status);
        let n = t.lab.id();
        std::fs::write(
            d.join("vmedge.toml"),
            format!(
                "domain = \"ssh.test\"\nregistry = \"file:state.json\"\nstate_dir = \"state\"\n\
                 vm_prefixes = [\"fd5e:ed00:{n:x}::/48\"]\nwake_url = \"http://{HOOK}/wake\"\n\
                 [ssh]\nlisten = [\"{LISTEN}\"]\nadmin = \"{ADMIN}\"\nhost_ca = [\"{}\"]\n\
                 connect_timeout = \"20s\"\nwake_timeout = \"20s\"\ngrace_period = \"2s\"\n",
                host_ca.public
            ),
        )
        .unwrap();
        t.gateway = Some(gateway(
            BIN,
            &t.lab.worker,
            &d.join("vmedge.toml"),
            LISTEN.parse().unwrap(),
        ));
        t
    }

    fn state(&self, vm1_status: &str) -> Value {
        let vm =
            |i: usize, org: &str, addr: Ipv6Addr, status: &str, host_keys: Option<Vec<String>>| {
                let mut v = json!({"id": vm_id(i), "org_id": org, "worker": "w",
                               "public_ipv6": addr.to_string(), "status": status});
                if let Some(keys) = host_keys {
                    v["ssh_host_keys"] = json!(keys);
                }
                v
            };
        let vms = &self.lab.vms;
        let listed = |i: usize| Some(vec![self.sshd[i].host_key.public.clone()]);
        let k = &self.keys;
        let key = |name: &str, pair: &KeyPair| json!({"name": name, "public_key": pair.public});
        json!({
        "users": [
            {"id": "u-1", "org_ids": ["o"], "ssh_keys": [
                key("ed", &k.ed25519), key("rsa", &k.rsa), key("p256", &k.ecdsa[0]),
                key("p384", &k.ecdsa[1]), key("p521", &k.ecdsa[2])]},
            {"id": "u-2", "org_ids": ["other"], "ssh_keys": [key("ed", &k.other_org)]}],
        "vms": [
            vm(0, "o", vms[0].ipv6, "running", listed(0)),
            vm(1, "o", vms[1].ipv6, vm1_status, None),
            vm(2, "other", vms[2].ipv6, "running", listed(2)),
            vm(STOPPED, "o", self.lab.unused_ipv6(), "stopped", None),
            vm(WRONG_HOST_KEY, "o", self.wrong_key_addr, "running", listed(2)),
            vm(HUNG, "o", self.hung_addr, "running", listed(0)),
        ]})
    }

    fn write_state(&self, vm1_status: &str) {
        write_state(self.dir.path(), &self.state(vm1_status));
    }

    fn ns(&self) -> &Netns {
        &self.lab.worker
    }

    fn options(&self, key: &KeyPair) -> Vec<String> {
        client_options(&key.private, 2222, &self.dir.path().join("known_hosts"))
    }

    /// `ssh -i KEY <vm i>@127.0.0.1 ARGS`.
    fn ssh(&self, key: &KeyPair, vm: usize, args: &[&str]) -> Output {
        ssh(
            self.ns(),
            &self.options(key),
            &format!("{}@127.0.0.1", vm_id(vm)),
            args,
        )
    }

    fn metrics(&self) -> String {
        http_get(self.ns(), ADMIN.parse().unwrap(), "admin", "/metrics")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn write_state(dir: &Path, state: &Value) {
    vmedge_tests::edge::write_state(dir, &state.to_string());
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn sha256(ns: &Netns, path: &Path) -> String {
    let out = shell(ns, &format!("sha256sum {}", path.display()));
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn exec_stdio_scp_sftp_pty_and_forwarding_reach_the_vm() {
    let t = SshLab::start("running");
    let ns = t.ns();
    let key = &t.keys.ed25519;

    // Exec: output and the remote exit code.
    let out = t.ssh(
        key,
        0,
        &["echo hello from $(hostname -I | tr -d ' ')-vm; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("hello from"),
        "{}",
        text(&out.stdout)
    );
    // stderr is its own stream, and the 32-hex form of the id is the same VM.
    let hex = format!("{}@127.0.0.1", vm_id(0).replace('-', ""));
    let out = ssh(ns, &t.options(key), &hex, &["echo out; echo err >&2"]);
    assert_eq!(
        (text(&out.stdout).as_str(), text(&out.stderr).as_str()),
        ("out\n", "err\n")
    );

    // The VM's sshd log names the platform user and the gateway session (certificate key id).
    let log = t.sshd[0].log_text();
    assert!(log.contains("user=u-1 session="), "sshd log: {log}");

    // 100 MB of random bytes through stdin and stdout.
    let input = t.path("in.bin");
    shell(
        ns,
        &format!("head -c 100M /dev/urandom > {}", input.display()),
    );
    let want = sha256(ns, &input);
    let output = t.path("out.bin");
    let opts = t.options(key).join(" ");
    let target = format!("{}@127.0.0.1", vm_id(0));
    let out = shell(
        ns,
        &format!(
            "ssh {opts} {target} cat < {} > {}",
            input.display(),
            output.display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        sha256(ns, &output),
        want,
        "stdin -> cat -> stdout changed the bytes"
    );

    // scp (SFTP protocol, and the legacy exec protocol) and sftp, both ways.
    let scp_opts = opts.replace("-p 2222", "-P 2222");
    for (mode, flag) in [("sftp", ""), ("legacy", "-O")] {
        let remote = format!("/tmp/vmedge-scp-{mode}");
        let back = t.path(&format!("back-{mode}.bin"));
        let out = shell(
            ns,
            &format!(
                "scp -q {flag} {scp_opts} {} {target}:{remote}",
                input.display()
            ),
        );
        assert!(out.status.success(), "scp {mode} up: {}", text(&out.stderr));
        let out = shell(
            ns,
            &format!(
                "scp -q {flag} {scp_opts} {target}:{remote} {}",
                back.display()
            ),
        );
        assert!(
            out.status.success(),
            "scp {mode} down: {}",
            text(&out.stderr)
        );
        assert_eq!(sha256(ns, &back), want, "scp {mode}");
    }
    let batch = t.path("sftp.batch");
    let back = t.path("back-sftp.bin");
    std::fs::write(
        &batch,
        format!(
            "put {} /tmp/vmedge-sftp\nget /tmp/vmedge-sftp {}\n",
            input.display(),
            back.display()
        ),
    )
    .unwrap();
    let out = shell(
        ns,
        &format!("sftp -q {scp_opts} -b {} {target}", batch.display()),
    );
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    assert_eq!(sha256(ns, &back), want, "sftp");

    // A pty: the remote side sees the client's size, then its change.
    let out = ns
        .command("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/ssh_pty.py"))
        .args(["ssh"])
        .args(t.options(key))
        .args(["-tt", &target, "stty size; read x; stty size"])
        .output()
        .unwrap();
    let pty = text(&out.stdout);
    assert!(out.status.success(), "pty: {pty} {}", text(&out.stderr));
    assert!(
        pty.contains("24 80") && pty.contains("40 100"),
        "window-change not seen: {pty:?}"
    );

    // ssh -L to an HTTP server inside the VM, ssh -R back to one on the client side.
    let _in_vm = backend(&t.lab.vms[0].ns, "http", 8000);
    let _at_client = backend(ns, "http", 8001);
    let local = spawn_ssh(
        &t,
        key,
        &[
            "-N",
            "-L",
            "127.0.0.1:18080:[::1]:8000",
            "-R",
            "127.0.0.1:19090:[::1]:8001",
        ],
    );
    let through_l = wait_for_http(ns, "127.0.0.1:18080");
    assert_eq!(through_l, "hello from 8000\n");
    let through_r = wait_for_http(&t.lab.vms[0].ns, "127.0.0.1:19090");
    assert_eq!(through_r, "hello from 8001\n");
    drop(local);

    let m = t.metrics();
    assert!(
        metric(&m, "vmedge_ssh_sessions_total").unwrap() >= 8.0,
        "{m}"
    );
    assert!(
        metric(&m, r#"vmedge_ssh_bytes_total{direction="to_vm"}"#).unwrap() > 400e6,
        "{m}"
    );
    assert!(
        metric(&m, r#"vmedge_ssh_channels_total{kind="direct-tcpip"}"#).unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, r#"vmedge_ssh_channels_total{kind="forwarded-tcpip"}"#).unwrap() >= 1.0,
        "{m}"
    );
}

/// `ssh -i KEY ARGS <vm 0>` left running.
fn spawn_ssh(t: &SshLab, key: &KeyPair, args: &[&str]) -> Process {
    let child = t
        .ns()
        .command("ssh")
        .args(t.options(key))
        .args(args)
        .arg(format!("{}@127.0.0.1", vm_id(0)))
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Process::new(child, "ssh")
}

/// GET /hello at `addr` in `ns`, retried until the forward is up.
fn wait_for_http(ns: &Netns, addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = ns
            .command("curl")
            .args(["-sS", "--max-time", "5", &format!("http://{addr}/hello")])
            .output()
            .unwrap();
        if out.status.success() {
            return text(&out.stdout);
        }
        assert!(Instant::now() < deadline, "{addr}: {}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_key_type_logs_in_and_every_refusal_looks_the_same() {
    let t = SshLab::start("running");
    let k = &t.keys;
    for (name, key, extra) in [
        ("ed25519", &k.ed25519, None),
        (
            "rsa-sha2-256",
            &k.rsa,
            Some("PubkeyAcceptedAlgorithms=rsa-sha2-256"),
        ),
        (
            "rsa-sha2-512",
            &k.rsa,
            Some("PubkeyAcceptedAlgorithms=rsa-sha2-512"),
        ),
        ("ecdsa 256", &k.ecdsa[0], None),
        ("ecdsa 384", &k.ecdsa[1], None),
        ("ecdsa 521", &k.ecdsa[2], None),
    ] {
        let mut options = t.options(key);
        if let Some(extra) = extra {
            options.extend(["-o".to_string(), extra.to_string()]);
        }
        let out = ssh(
            t.ns(),
            &options,
            &format!("{}@127.0.0.1", vm_id(0)),
            &["echo in"],
        );
        assert_eq!(text(&out.stdout), "in\n", "{name}: {}", text(&out.stderr));
    }

    // Unknown key, another org's VM, an unknown VM, a name that is no VM id, and SHA-1 RSA:
    // the same answer every time.
    let mut sha1 = t.options(&k.rsa);
    sha1.extend([
        "-o".to_string(),
        "PubkeyAcceptedAlgorithms=ssh-rsa".to_string(),
    ]);
    let refusals = [
        ("unknown key", t.ssh(&k.stranger, 0, &["true"])),
        ("other org's VM", t.ssh(&k.ed25519, 2, &["true"])),
        ("other org's key", t.ssh(&k.other_org, 0, &["true"])),
        ("unknown VM", t.ssh(&k.ed25519, UNKNOWN, &["true"])),
        (
            "not a VM id",
            ssh(t.ns(), &t.options(&k.ed25519), "root@127.0.0.1", &["true"]),
        ),
        (
            "ssh-rsa (SHA-1)",
            ssh(t.ns(), &sha1, &format!("{}@127.0.0.1", vm_id(0)), &["true"]),
        ),
    ];
    let first = &refusals[0].1;
    for (what, out) in &refusals {
        assert_eq!(out.status.code(), Some(255), "{what}");
        assert!(
            text(&out.stderr).contains("Permission denied (publickey)"),
            "{what}: {}",
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stderr)
                .replace(&vm_id(UNKNOWN), "")
                .replace(&vm_id(0), "")
                .replace(&vm_id(2), "")
                .replace("root", ""),
            text(&first.stderr).replace(&vm_id(0), ""),
            "{what} differs from an unknown key"
        );
    }
    let m = t.metrics();
    for reason in ["unknown_key", "other_org", "unknown_vm", "not_a_vm_id"] {
        let name = format!("vmedge_ssh_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(metric(&m, &name).unwrap_or(0.0) >= 1.0, "{name} in {m}");
    }

    // The CA the gateway logs in with is the one `vmedge ssh-gateway ca` prints.
    let ca = std::process::Command::new(BIN)
        .args(["ssh-gateway", "ca", "--config"])
        .arg(t.path("vmedge.toml"))
        .output()
        .unwrap();
    let printed = text(&ca.stdout);
    let ca_pub = public_line(&t.path("state/ssh_user_ca_key.pub"));
    assert!(
        printed.contains(&ca_pub) && printed.contains("TrustedUserCAKeys"),
        "{printed}"
    );
}

#[test]
fn host_keys_vm_states_wake_hung_vms_and_fifty_sessions() {
    let t = SshLab::start("paused");
    let key = &t.keys.ed25519;

    // A stopped VM: told after authentication, in one line.
    let out = t.ssh(key, STOPPED, &["true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains(&format!("VM {} is stopped", vm_id(STOPPED))),
        "{}",
        text(&out.stderr)
    );

    // A VM whose host key is not the one the state lists: refused, and said so.
    let out = t.ssh(key, WRONG_HOST_KEY, &["true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("host key the gateway does not trust"),
        "{}",
        text(&out.stderr)
    );

    // A hung VM holds only its own session: VM 0 answers while that one still waits (it
    // gives up only after connect_timeout).
    let mut hung = spawn_ssh_to(&t, key, HUNG);
    assert_eq!(text(&t.ssh(key, 0, &["echo fine"]).stdout), "fine\n");
    hung.assert_running();
    drop(hung);

    // A paused VM (VM 1, host certificate from the host CA): woken through the hook once,
    // then the session goes through.
    let calls = wake_hook(
        t.ns(),
        HOOK,
        vm_id(1),
        t.dir.path().to_path_buf(),
        t.state("running").to_string(),
        Duration::from_millis(300),
    );
    let out = t.ssh(key, 1, &["echo awake"]);
    assert_eq!(text(&out.stdout), "awake\n", "{}", text(&out.stderr));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Fifty sessions at once.
    let opts = t.options(key).join(" ");
    let target = format!("{}@127.0.0.1", vm_id(0));
    let out = shell(
        t.ns(),
        &format!(
            "mkdir -p {dir}; for i in $(seq 50); do ssh {opts} {target} echo ok$i > {dir}/$i 2>&1 & done; wait; cat {dir}/*",
            dir = t.path("fifty").display()
        ),
    );
    let all = text(&out.stdout);
    let answered = all.lines().filter(|l| l.starts_with("ok")).count();
    assert_eq!(answered, 50, "{all}");

    let m = t.metrics();
    assert!(
        metric(
            &m,
            r#"vmedge_ssh_upstream_failures_total{reason="host_key"}"#
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"vmedge_ssh_upstream_failures_total{reason="vm_state"}"#
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
}

fn spawn_ssh_to(t: &SshLab, key: &KeyPair, vm: usize) -> Process {
    let child = t
        .ns()
        .command("ssh")
        .args(t.options(key))
        .arg(format!("{}@127.0.0.1", vm_id(vm)))
        .arg("true")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Process::new(child, "ssh to a hung VM")
}

#[test]
fn a_reader_that_stops_holds_back_its_own_channel_only_and_sigterm_lets_sessions_finish() {
    let mut t = SshLab::start("running");
    let key = &t.keys.ed25519;
    let pid = t.gateway.as_ref().unwrap().id();
    let before = vmedge_tests::rss_kb(pid);

    // One user connection (OpenSSH connection sharing), so one VM connection behind it.
    // Its first session: the VM writes as fast as it can, the user reads nothing. The
    // gateway must pass the pressure back to the VM on that channel alone, rather than
    // hold the bytes or stop the connection.
    let opts = t.options(key).join(" ");
    let target = format!("{}@127.0.0.1", vm_id(0));
    let control = format!("ControlPath={}", t.path("mux.sock").display());
    let mux = format!("-o {control}");
    let mut stalled = t
        .ns()
        .command("ssh")
        .args(t.options(key))
        .args([
            "-o",
            &control,
            "-o",
            "ControlMaster=yes",
            &target,
            "cat /dev/zero",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let unread = stalled.stdout.take().unwrap();
    let stalled = Process::new(stalled, "stalled reader");
    // And the other way: a session on it sends as fast as it can to a VM process that
    // reads nothing.
    let unwritten = t
        .ns()
        .command("ssh")
        .args(t.options(key))
        .args([
            "-o",
            &control,
            "-o",
            "ControlMaster=no",
            &target,
            "sleep 120",
        ])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .spawn()
        .unwrap();
    let unwritten = Process::new(unwritten, "stalled writer");
    std::thread::sleep(Duration::from_millis(3500));
    let during = vmedge_tests::rss_kb(pid);
    assert!(
        during < before + 16 * 1024,
        "the gateway grew from {before} kB to {during} kB while its reader stalled"
    );

    // Other sessions on that same connection still move, in bulk both ways and
    // interactively (`timeout` only turns a hang into a failure).
    let shared = |remote: &str| {
        t.ns()
            .command("sh")
            .args([
                "-c",
                &format!("timeout 60 ssh {opts} {mux} -o ControlMaster=no {target} {remote}"),
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let bulk = shared("'head -c 20000000 /dev/zero | wc -c'");
    assert_eq!(text(&bulk.stdout), "20000000\n", "{bulk:?}");
    let bulk = shared("'head -c 20000000 /dev/zero' | wc -c");
    assert_eq!(text(&bulk.stdout), "20000000\n", "{bulk:?}");
    let upload = t
        .ns()
        .command("sh")
        .args([
            "-c",
            &format!(
                "head -c 20000000 /dev/zero \\
                 | timeout 60 ssh {opts} {mux} -o ControlMaster=no {target} 'wc -c'"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(text(&upload.stdout), "20000000\n", "{upload:?}");
    let echo = shared("'echo still here'");
    assert_eq!(text(&echo.stdout), "still here\n", "{echo:?}");
    let after = vmedge_tests::rss_kb(pid);
    assert!(
        after < before + 16 * 1024,
        "the gateway grew from {before} kB to {after} kB with a stalled channel beside busy ones"
    );
    // The reader reads what was held back and goes; the shared connection is closed.
    let mut held = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(unread, 4 << 20), &mut held).unwrap();
    assert_eq!(held.len(), 4 << 20);
    let closed = shared("-O exit");
    assert!(closed.status.success(), "{closed:?}");
    drop(unwritten);
    drop(stalled);

    // SIGTERM: no new sessions, the open one finishes.
    let running = t
        .ns()
        .command("ssh")
        .args(t.options(key))
        .args([&target, "sleep 1; echo finished"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let gateway = t.gateway.as_mut().unwrap();
    gateway.signal("TERM");
    std::thread::sleep(Duration::from_millis(100));
    let refused = t.ssh(key, 0, &["true"]);
    assert_eq!(
        refused.status.code(),
        Some(255),
        "a new session was accepted after SIGTERM"
    );
    let finished = running.wait_with_output().unwrap();
    assert_eq!(
        text(&finished.stdout),
        "finished\n",
        "the open session was cut"
    );
    assert!(
        t.gateway
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(5)),
        "the gateway did not exit after its sessions ended"
    );
}

#[test]
fn static_key_login_exit_signal_idle_timeout_and_limits() {
    // One VM whose sshd knows no CA, only the gateway's static key.
    let lab = Lab::new(1);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let user = keygen(d, "id_ed25519", "ed25519", None);
    let stranger = keygen(d, "id_stranger", "ed25519", None);
    let static_key = keygen(d, "gateway_static", "ed25519", None);
    let vm = &lab.vms[0];
    let sshd = Sshd::start(
        &vm.ns,
        &d.join("vm"),
        &[vm.ipv6],
        SshdOptions {
            authorized_keys: vec![static_key.public.clone()],
            ..SshdOptions::default()
        },
    );
    let state = json!({
        "users": [{"id": "u-1", "org_ids": ["o"], "ssh_keys": [{"name": "k", "public_key": user.public}]}],
        "vms": [{"id": vm_id(0), "org_id": "o", "worker": "w", "public_ipv6": vm.ipv6.to_string(),
                 "status": "running", "ssh_host_keys": [sshd.host_key.public]}]});
    write_state(d, &state);
    let n = lab.id();
    std::fs::write(
        d.join("vmedge.toml"),
        format!(
            "registry = \"file:state.json\"\nstate_dir = \"state\"\n\
             vm_prefixes = [\"fd5e:ed00:{n:x}::/48\"]\n\
             [ssh]\nlisten = [\"{LISTEN}\"]\nadmin = \"{ADMIN}\"\nstatic_key = \"{}\"\n\
             idle_timeout = \"3s\"\nmax_sessions_per_user = 2\nauth_failures_per_minute = 3\n",
            static_key.private.display()
        ),
    )
    .unwrap();
    let _gateway = gateway(
        BIN,
        &lab.worker,
        &d.join("vmedge.toml"),
        LISTEN.parse().unwrap(),
    );
    let known = d.join("known_hosts");
    let target = format!("{}@127.0.0.1", vm_id(0));
    let run = |key: &KeyPair, remote: &str| {
        ssh(
            &lab.worker,
            &client_options(&key.private, 2222, &known),
            &target,
            &[remote],
        )
    };

    // The static key logs in (the VM's sshd has no CA to trust).
    let ok = run(&user, "echo static");
    assert_eq!(text(&ok.stdout), "static\n", "{ok:?}");

    // A command killed by a signal: the client hears exit-signal (OpenSSH's client says so
    // only in its debug log), not an exit status.
    let mut verbose = client_options(&user.private, 2222, &known);
    let at = verbose.iter().position(|o| o == "LogLevel=ERROR").unwrap();
    verbose[at] = "LogLevel=DEBUG1".into();
    let killed = ssh(&lab.worker, &verbose, &target, &["kill -TERM $$"]);
    assert_eq!(killed.status.code(), Some(255), "{killed:?}");
    let log = text(&killed.stderr);
    assert!(log.contains("rtype exit-signal"), "{log}");
    assert!(!log.contains("rtype exit-status"), "{log}");

    // Idle: no channel data for 3 s and the connection is closed (keepalives do not count).
    let started = Instant::now();
    let idle = run(&user, "sleep 30; echo late");
    assert!(text(&idle.stdout).is_empty(), "{idle:?}");
    assert!(text(&idle.stderr).contains("idle timeout"), "{idle:?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "not closed for idleness"
    );
    // Output keeps a session alive past the idle timeout.
    let busy = run(&user, "for i in 1 2 3 4 5 6; do echo $i; sleep 1; done");
    assert_eq!(text(&busy.stdout), "1\n2\n3\n4\n5\n6\n", "{busy:?}");

    // Two connections per user at most: the third is refused like any other refusal.
    let opts = client_options(&user.private, 2222, &known).join(" ");
    let open: Vec<Process> = (0..2)
        .map(|_| {
            let mut child = lab
                .worker
                .command("sh")
                .args([
                    "-c",
                    &format!("exec ssh {opts} {target} 'echo up; sleep 60'"),
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            let stdout = child.stdout.take().unwrap();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
            assert_eq!(line, "up\n");
            Process::new(child, "open session")
        })
        .collect();
    let third = run(&user, "true");
    assert_eq!(third.status.code(), Some(255));
    assert!(
        text(&third.stderr).contains("Permission denied"),
        "{third:?}"
    );
    drop(open);

    // Failures per source address: three refused keys use the allowance, then even the
    // right key is turned away at the door until it refills.
    for _ in 0..3 {
        let refused = run(&stranger, "true");
        assert!(
            text(&refused.stderr).contains("Permission denied"),
            "{refused:?}"
        );
    }
    let blocked = run(&user, "true");
    assert_eq!(blocked.status.code(), Some(255), "{blocked:?}");
    assert!(
        !text(&blocked.stderr).contains("Permission denied"),
        "{blocked:?}"
    );
    let m = http_get(&lab.worker, ADMIN.parse().unwrap(), "admin", "/metrics");
    assert!(
        metric(
            &m,
            r#"vmedge_ssh_refused_connections_total{reason="auth_failures"}"#
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"vmedge_ssh_auth_failures_total{reason="session_limit"}"#
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
}
