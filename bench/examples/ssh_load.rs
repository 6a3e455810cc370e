//! bench/ssh: the SSH gateway against OpenSSH's own way through a bastion, `ssh -J` (here
//! its equivalent `ProxyCommand ssh -W`) through an sshd jump host, in one run, both in
//! the worker namespace in front of the same VM sshd:
//! - bulk throughput: `cat` of N bytes (`head -c N /dev/zero`) and an sftp download;
//! - interactive echo latency through `ssh -tt ... cat`, idle and while a bulk transfer
//!   runs on the same connection (OpenSSH connection sharing: ControlMaster);
//! - 100 parallel `ssh vm true`, wall time;
//! - resident memory per idle session (the gateway process; the jump host's sshd with
//!   its per-connection processes).
//!
//! `VMEDGE_BIN=target/release/vmedge cargo run --release -p vmedge-bench --example ssh_load [-- --quick]`
//! (root; bench/load/ssh.sh does both).
#![allow(clippy::unwrap_used)] // a benchmark may panic on what it did not expect

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmedge_tests::edge::Process;
use vmedge_tests::ssh::{client_options, gateway, keygen, shell, Sshd, SshdOptions};
use vmedge_tests::{rss_kb, Lab, Netns};

const VM: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
const LISTEN: &str = "127.0.0.1:2222";

/// How to reach the VM: options and target for ssh, plus the same for scp/sftp.
struct Route {
    name: &'static str,
    ssh: String,
    target: String,
    /// The target as sftp reads it (an IPv6 address in brackets, else `host:path`).
    sftp_target: String,
}

impl Route {
    fn command(&self, args: &str) -> String {
        format!("ssh {} {} {args}", self.ssh, self.target)
    }
}

fn run(ns: &Netns, line: &str) -> Output {
    let out = shell(ns, line);
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Seconds a shell line takes.
fn timed(ns: &Netns, line: &str) -> f64 {
    let started = Instant::now();
    run(ns, line);
    started.elapsed().as_secs_f64()
}

/// p50 and p99 in ms, or `None` when a round trip stalled (over 20 s).
fn echo(ns: &Netns, n: usize, ssh_argv: &str) -> Option<(f64, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/ssh_echo.py");
    let out = run(ns, &format!("python3 {} {n} {ssh_argv}", script.display()));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Some((v["p50_ms"].as_f64()?, v["p99_ms"].as_f64()?))
}

/// `sleep 600` processes in the VM (one per logged-in idle session).
fn count_sleeps(vm: &Netns) -> usize {
    let out = shell(vm, "pgrep -c -f '^sleep 600' || true");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn show(v: Option<(f64, f64)>) -> String {
    v.map_or_else(
        || "     stalled    ".to_string(),
        |(p50, p99)| format!("{p50:>6.2} / {p99:>6.2}"),
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let bin = std::env::var("VMEDGE_BIN").expect("VMEDGE_BIN: the vmedge binary to measure");
    let (bytes, echoes, parallel, idle) = if quick {
        (64u64 << 20, 50, 20, 10)
    } else {
        (1u64 << 30, 500, 100, 100)
    };
    let lab = Lab::new(1);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = &lab.worker;
    let vm = &lab.vms[0];

    // The VM's sshd trusts the gateway CA and, for the jump route, the user's key.
    std::fs::create_dir_all(d.join("state")).unwrap();
    let ca = keygen(&d.join("state"), "ssh_user_ca_key", "ed25519", None);
    let user = keygen(d, "id_ed25519", "ed25519", None);
    let vm_sshd = Sshd::start(
        &vm.ns,
        &d.join("vm"),
        &[vm.ipv6],
        SshdOptions {
            user_ca: Some(&ca.public),
            authorized_keys: vec![user.public.clone()],
            ..SshdOptions::default()
        },
    );
    // The jump host: an sshd on the worker's own address.
    let jump = Sshd::start(
        w,
        &d.join("jump"),
        &[lab.worker_ipv6],
        SshdOptions {
            authorized_keys: vec![user.public.clone()],
            ..SshdOptions::default()
        },
    );
    let jump_pid = std::fs::read_to_string(d.join("jump/sshd.pid"))
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();

    // The gateway, release build, in the same namespace.
    std::fs::write(
        d.join("state.json"),
        json!({"users": [{"id": "u-1", "org_ids": ["o"], "ssh_keys": [{"name": "k", "public_key": user.public}]}],
               "vms": [{"id": VM, "org_id": "o", "worker": "w", "public_ipv6": vm.ipv6.to_string(),
                        "status": "running", "ssh_host_keys": [vm_sshd.host_key.public]}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("vmedge.toml"),
        format!(
            "registry = \"file:state.json\"\nstate_dir = \"state\"\nvm_prefixes = [\"fd5e:ed00::/32\"]\n\
             [ssh]\nlisten = [\"{LISTEN}\"]\nadmin = \"127.0.0.1:9181\"\nmax_sessions_per_user = 1000\n\
             auth_failures_per_minute = 0\ngrace_period = \"0s\"\n"
        ),
    )
    .unwrap();
    let gw = gateway(
        &bin,
        w,
        &d.join("vmedge.toml"),
        LISTEN.parse::<SocketAddr>().unwrap(),
    );

    let known = d.join("known_hosts");
    let base = client_options(&user.private, 22, &known).join(" ");
    let routes = [
        Route {
            name: "vmedge",
            ssh: client_options(&user.private, 2222, &known).join(" "),
            target: format!("{VM}@127.0.0.1"),
            sftp_target: format!("{VM}@127.0.0.1"),
        },
        Route {
            name: "ssh -J",
            ssh: format!(
                "{base} -o 'ProxyCommand=ssh {base} -W [%h]:%p root@{}'",
                lab.worker_ipv6
            ),
            target: format!("root@{}", vm.ipv6),
            sftp_target: format!("root@[{}]", vm.ipv6),
        },
    ];
    let mb = bytes as f64 / 1e6;
    run(
        &vm.ns,
        &format!(
            "head -c {bytes} /dev/urandom > {}",
            d.join("vm/big").display()
        ),
    );

    // First, while the gateway's heap is fresh (later transfers leave freed memory behind).
    println!("memory per idle session ({idle} sessions running `sleep 600`; resident kB):");
    for (r, pid) in routes.iter().zip([gw.id(), jump_pid]) {
        // The previous route's sessions gone first.
        let deadline = Instant::now() + Duration::from_secs(30);
        while count_sleeps(&vm.ns) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let before = rss_kb(pid);
        let mut sessions = Vec::new();
        for _ in 0..idle {
            let child = w
                .command("sh")
                // exec: the TERM that ends the session reaches ssh itself.
                .args(["-c", &format!("exec {}", r.command("'sleep 600'"))])
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            sessions.push(Process::new(child, "idle session"));
            // Spread out a little: a burst of logins times out at the jump host's sshd.
            std::thread::sleep(Duration::from_millis(20));
        }
        // Measured once every session is logged in (the VM's sshd runs each `sleep`).
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_sleeps(&vm.ns) < idle && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(1));
        let after = rss_kb(pid);
        println!(
            "  {:<8} {:>8} kB before, {:>8} kB with them: {:>6.1} kB per session",
            r.name,
            before,
            after,
            (after.saturating_sub(before)) as f64 / idle as f64
        );
        drop(sessions);
        // Without a pty nothing tells the remote `sleep` its session is gone.
        shell(&vm.ns, "pkill -f '^sleep 600' || true");
    }
    println!();

    println!("bulk: {mb:.0} MB from the VM (cat of /dev/zero to /dev/null; sftp get of a file)");
    let mut bulk = Vec::new();
    for r in &routes {
        let cat = timed(
            w,
            &r.command(&format!("'head -c {bytes} /dev/zero' > /dev/null")),
        );
        let sftp_batch = d.join("get.batch");
        std::fs::write(
            &sftp_batch,
            format!("get {} /dev/null\n", d.join("vm/big").display()),
        )
        .unwrap();
        let sftp_opts = r.ssh.replacen(" -p ", " -P ", 1);
        let sftp = timed(
            w,
            &format!(
                "sftp -q {sftp_opts} -b {} {}",
                sftp_batch.display(),
                r.sftp_target
            ),
        );
        println!(
            "  {:<8} cat {:>7.1} MB/s   sftp {:>7.1} MB/s",
            r.name,
            mb / cat,
            mb / sftp
        );
        bulk.push((mb / cat, mb / sftp));
    }
    println!(
        "  vmedge/jump: cat {:.2}x, sftp {:.2}x",
        bulk[0].0 / bulk[1].0,
        bulk[0].1 / bulk[1].1
    );

    println!("\ninteractive echo through ssh -tt ... cat, {echoes} round trips (p50 / p99 ms):");
    println!("  (shared: a second session on one connection (ControlMaster); under bulk: while");
    println!(
        "  another session on that connection pulls {} MB)",
        4 * bytes / 1_000_000
    );
    let mut lat = Vec::new();
    for r in &routes {
        let idle = echo(w, echoes, &r.command("-tt cat"));
        let sock = d.join(format!("mux-{}", r.name.replace(' ', "")));
        let mux = format!("-o ControlPath={} ", sock.display());
        run(
            w,
            &format!(
                "ssh {} {mux} -o ControlMaster=yes -o ControlPersist=120 -f -N {}",
                r.ssh, r.target
            ),
        );
        let shared = echo(
            w,
            echoes,
            &format!("ssh {} {mux} -tt {} cat", r.ssh, r.target),
        );
        let bulk = w
            .command("sh")
            .args([
                "-c",
                &format!(
                    "ssh {} {mux} {} 'head -c {} /dev/zero' > /dev/null",
                    r.ssh,
                    r.target,
                    bytes * 4
                ),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let bulk = Process::new(bulk, "bulk transfer");
        std::thread::sleep(Duration::from_millis(300));
        let busy = echo(
            w,
            echoes,
            &format!("ssh {} {mux} -tt {} cat", r.ssh, r.target),
        );
        drop(bulk);
        let _ = shell(w, &format!("ssh {mux} -O exit {} 2>/dev/null", r.target));
        println!(
            "  {:<8} own {}   shared {}   under bulk {}",
            r.name,
            show(idle),
            show(shared),
            show(busy)
        );
        lat.push((idle, busy));
    }
    if let ((Some(a), _), (Some(b), _)) = (lat[0], lat[1]) {
        println!("  vmedge/jump p99, own connection: {:.2}x", a.1 / b.1);
    }
    if let ((_, Some(a)), (_, Some(b))) = (lat[0], lat[1]) {
        println!("  vmedge/jump p99, under bulk: {:.2}x", a.1 / b.1);
    }

    println!("\n{parallel} parallel `ssh vm true` (new connection each), wall time:");
    let mut walls = Vec::new();
    for r in &routes {
        let line = format!(
            "for i in $(seq {parallel}); do {} & done; wait",
            r.command("true")
        );
        let wall = timed(w, &line);
        println!("  {:<8} {:>6.2} s", r.name, wall);
        walls.push(wall);
    }
    println!("  vmedge/jump: {:.2}x", walls[0] / walls[1]);

    drop(jump);
    drop(gw);
}
