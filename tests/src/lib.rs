//! The network-namespace harness for end-to-end tests.
//!
//! A [`Lab`] is one worker namespace and N VM namespaces, each VM joined to the worker
//! by a veth pair (the worker end plays the VM's tap). The worker routes between VMs.
//! Everything is removed when the lab is dropped, also while a test panics, and a lab id
//! left behind by a killed run is swept when it is claimed again.
//!
//! [`peers`] has echo servers, NSD and probes that run inside namespaces; [`gate`] runs
//! the DNS gate inside a worker namespace; [`edge`] has the edge's backends and clients
//! (Python HTTP, WebSocket and gRPC peers, curl) and runs `vmedge edge` in a namespace;
//! [`etcd`] runs a three-member etcd cluster on a namespace's loopback;
//! [`alloc`] has a counting global allocator for "allocates nothing" checks.
//!
//! # Address plan (DESIGN.md, last section)
//! This machine's own network (DESIGN.md, last section) is never used here. Labs live in
//! `fd5e:ed00::/32` and `198.18.0.0/15` only, and before the first lab the root namespace
//! gets unreachable routes for `fd5e::/16` and `198.18.0.0/15`,
//! so a packet with a missing link is dropped instead of leaving the machine.
//!
//! | what                         | IPv6                      | IPv4                  |
//! |------------------------------|---------------------------|-----------------------|
//! | VM `i` of lab `n`            | `fd5e:ed00:n:(i+1)::2/64` | `198.18.n.(4i+2)/30`  |
//! | the worker's end of its link | `fd5e:ed00:n:(i+1)::1/64` | `198.18.n.(4i+1)/30`  |
//! | the worker's own address     | `fd5e:ed00:n::53/128` (lo, the DNS gate's) | |
//! | an address no VM has         | `fd5e:ed00:n:ff::9`       | `198.18.n.253`        |
//!
//! Namespaces are `vme<n>w` (worker) and `vme<n>v<i>` (VMs); the worker's end of VM
//! `i`'s link is `vmtap<i>`, the VM's end `eth0`. Lab ids 1..=250 are claimed with an
//! flock on `/tmp/vmedge-lab-<n>.lock`, which the kernel releases if the process dies.

pub mod alloc;
pub mod edge;
pub mod etcd;
pub mod gate;
pub mod peers;
pub mod ssh;

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::Once;

use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, CloneFlags};

/// The IPv6 prefix of every test namespace.
pub const TEST_IPV6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd5e, 0xed00, 0, 0, 0, 0, 0, 0), 32);
/// The IPv4 prefix of every test namespace.
pub const TEST_IPV4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);

const MAX_LABS: u16 = 250;
const MAX_VMS: usize = 62;

/// Waits until `check` holds, asking every 50 ms; panics naming `what` after `within`.
pub fn eventually(what: &str, within: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs a command and panics with its output if it fails: the harness cannot go on.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// Installs the unreachable safety routes in the root namespace (once per process).
pub fn install_safety_routes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "end-to-end tests need root (network namespaces, nftables); run them with scripts/test"
        );
        ip(&[
            "-6",
            "route",
            "replace",
            "unreachable",
            "fd5e::/16",
            "metric",
            "4000",
        ]);
        ip(&[
            "route",
            "replace",
            "unreachable",
            "198.18.0.0/15",
            "metric",
            "4000",
        ]);
    });
}

/// One network namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        // No duplicate address detection: addresses are usable at once, and they are unique by plan.
        ns.sh(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace; panics if it fails.
    pub fn sh(&self, argv: &[&str]) -> Output {
        run(self.command(argv[0]).args(&argv[1..]))
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a new thread that has entered the namespace. Sockets made there stay in
    /// the namespace when handed back, so servers and clients can be made here and used
    /// from any thread (or a tokio runtime).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends inside it.
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if let Ok(out) = out {
            if !out.status.success() {
                eprintln!(
                    "harness: cannot delete netns {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Moves the calling thread into the named namespace for good: for a thread that builds a
/// runtime there (threads it starts are born in the namespace too).
pub fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// A VM of a lab: its namespace and addresses.
#[derive(Debug)]
pub struct VmHost {
    /// The VM's namespace.
    pub ns: Netns,
    /// The VM's public IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The VM's IPv4 address on its link.
    pub ipv4: Ipv4Addr,
    /// The worker's end of the link, IPv6 (the VM's gateway).
    pub gateway_ipv6: Ipv6Addr,
    /// The worker's end of the link, IPv4 (the VM's gateway).
    pub gateway_ipv4: Ipv4Addr,
    /// The worker's end of the link: the VM's tap, as the state's `interface` names it.
    pub interface: String,
}

/// A worker namespace with VM namespaces behind it.
#[derive(Debug)]
pub struct Lab {
    id: u16,
    // Field order is drop order: VMs first, then the worker, then the lock.
    /// The VMs, in order.
    pub vms: Vec<VmHost>,
    /// The worker's namespace.
    pub worker: Netns,
    /// The worker's own address (on its loopback): where the DNS gate will listen.
    pub worker_ipv6: Ipv6Addr,
    _claim: Flock<File>,
}

impl Lab {
    /// A worker with `vms` VMs behind it, all links up and routed.
    pub fn new(vms: usize) -> Lab {
        assert!(vms <= MAX_VMS, "a lab has at most {MAX_VMS} VMs");
        install_safety_routes();
        let (id, claim) = claim_lab_id();
        let n = id;
        let worker = Netns::create(format!("vme{n}w"));
        worker.sh(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.ip_forward=1",
        ]);
        let worker_ipv6 = Ipv6Addr::new(0xfd5e, 0xed00, n, 0, 0, 0, 0, 0x53);
        worker.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{worker_ipv6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        let mut lab = Lab {
            id,
            vms: Vec::with_capacity(vms),
            worker,
            worker_ipv6,
            _claim: claim,
        };
        for i in 0..vms {
            lab.add_vm(i);
        }
        lab
    }

    fn add_vm(&mut self, i: usize) {
        let n = self.id;
        let ns = Netns::create(format!("vme{n}v{i}"));
        let interface = format!("vmtap{i}");
        // Link 0 (fd5e:ed00:n::/64) holds the worker's own address, so VM links start at 1.
        let link = i as u16 + 1;
        let ipv6 = Ipv6Addr::new(0xfd5e, 0xed00, n, link, 0, 0, 0, 2);
        let gateway_ipv6 = Ipv6Addr::new(0xfd5e, 0xed00, n, link, 0, 0, 0, 1);
        let base = 4 * i as u8;
        let ipv4 = Ipv4Addr::new(198, 18, n as u8, base + 2);
        let gateway_ipv4 = Ipv4Addr::new(198, 18, n as u8, base + 1);
        let w = self.worker.name();
        ip(&[
            "link",
            "add",
            &interface,
            "netns",
            w,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        self.worker.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gateway_ipv6}/64"),
            "dev",
            &interface,
            "nodad",
        ]);
        self.worker.ip(&[
            "addr",
            "add",
            &format!("{gateway_ipv4}/30"),
            "dev",
            &interface,
        ]);
        self.worker.ip(&["link", "set", &interface, "up"]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.ip(&["addr", "add", &format!("{ipv4}/30"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway_ipv6.to_string(),
        ]);
        ns.ip(&["route", "add", "default", "via", &gateway_ipv4.to_string()]);
        self.vms.push(VmHost {
            ns,
            ipv6,
            ipv4,
            gateway_ipv6,
            gateway_ipv4,
            interface,
        });
    }

    /// The lab's id (the third group of its IPv6 addresses, the third byte of its IPv4).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// An IPv6 address inside the test prefix that no VM has ("outside the VM prefixes" cases).
    pub fn unused_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd5e, 0xed00, self.id, 0xff, 0, 0, 0, 9)
    }

    /// An IPv4 address inside the test prefix that no VM has.
    pub fn unused_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.id as u8, 253)
    }

    /// The names of the lab's namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        let mut names = vec![self.worker.name().to_string()];
        names.extend(self.vms.iter().map(|v| v.ns.name().to_string()));
        names
    }
}

/// The namespaces that exist now.
pub fn list_namespaces() -> Vec<String> {
    let out = ip(&["netns", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Claims a free lab id; namespaces of a previous owner that died are swept first.
fn claim_lab_id() -> (u16, Flock<File>) {
    for n in 1..=MAX_LABS {
        let path = format!("/tmp/vmedge-lab-{n}.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let Ok(claim) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        let prefix = format!("vme{n}");
        for stale in list_namespaces() {
            let rest = stale.strip_prefix(&prefix).unwrap_or_default();
            if rest == "w"
                || (rest.starts_with('v')
                    && rest[1..].bytes().all(|c| c.is_ascii_digit())
                    && rest.len() > 1)
            {
                eprintln!("harness: removing netns {stale} left by a run that died");
                ip(&["netns", "del", &stale]);
            }
        }
        return (n, claim);
    }
    panic!("all {MAX_LABS} lab ids are in use");
}

/// A process and its descendants (nginx's workers, sshd's per-connection processes),
/// from /proc: the children of each of their threads.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = Vec::new();
    let mut pending = vec![pid];
    while let Some(p) = pending.pop() {
        tree.push(p);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children"));
            pending.extend(
                children
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    tree
}

/// Resident kB of a process and its children ([`process_tree`]), from /proc.
pub fn rss_kb(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// CPU time (ns) a process and its children ([`process_tree`]) have run, all their
/// threads, from /proc (`schedstat`).
pub fn cpu_ns(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|task| {
            // "<ns on the cpu> <ns waiting> <slices>"
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}
