//! A three-member etcd cluster (Debian's `etcd-server`) on the loopback of a namespace,
//! whose members can be killed and brought back, and `etcdctl` against it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::edge::{wait_listening, Process};
use crate::Netns;

/// Client ports are `BASE + 1 ..= BASE + 3`, peer ports `BASE + 11 ..= BASE + 13`: each
/// namespace has its own loopback, so these never meet a host's own etcd on 2379.
const BASE: u16 = 23780;

/// One member: its name, URLs and process while it runs.
struct Member {
    name: String,
    client: SocketAddr,
    process: Option<Process>,
}

impl Member {
    fn url(&self) -> String {
        format!("http://{}", self.client)
    }
}

/// Three etcd members in one namespace, each with its own data directory.
pub struct EtcdCluster<'ns> {
    ns: &'ns Netns,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl<'ns> EtcdCluster<'ns> {
    /// Starts the three members and waits until the cluster has a leader.
    pub fn start(ns: &'ns Netns) -> EtcdCluster<'ns> {
        // Data in memory where there is /dev/shm: etcd fsyncs every write.
        let dir = tempfile::Builder::new()
            .prefix("vmedge-etcd")
            .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .unwrap_or_else(|e| panic!("etcd data dir: {e}"));
        let members = (1..=3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: SocketAddr::from(([127, 0, 0, 1], BASE + i)),
                process: None,
            })
            .collect();
        let mut cluster = EtcdCluster { ns, dir, members };
        for i in 0..3 {
            cluster.start_member(i);
        }
        cluster.wait_leader();
        cluster
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// The client URLs of the members that run, comma-separated, as etcdctl takes them.
    fn running(&self) -> String {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.process.is_some())
            .map(Member::url)
            .collect();
        running.join(",")
    }

    /// `etcd:URL,URL,URL`, as a config's `registry`.
    pub fn registry(&self) -> String {
        format!("etcd:{}", self.endpoints().join(","))
    }

    /// Starts member `i` (again: it rejoins with the data it had).
    pub fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = (1..=3)
            .map(|j| format!("m{j}=http://127.0.0.1:{}", BASE + 10 + j))
            .collect();
        let member = &self.members[i];
        let peer = format!("http://127.0.0.1:{}", BASE + 11 + i as u16);
        let client = member.url();
        let data: PathBuf = self.dir.path().join(&member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", member.name)))
            .unwrap_or_else(|e| panic!("etcd log: {e}"));
        let child = self
            .ns
            .command("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "vmedge-test",
            ])
            // Quick elections on loopback; room for a whole test state in one transaction.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args([
                "--max-txn-ops",
                "10000",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(log) // grpc-go logs on its own, whatever --log-level says
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd (is etcd-server installed?): {e}"));
        let client_addr = member.client;
        self.members[i].process = Some(Process::new(child, &format!("etcd {}", member.name)));
        wait_listening(self.ns, client_addr, "etcd");
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers or clients).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut process) = self.members[i].process.take() {
            process.signal("KILL");
            process.wait_exit(Duration::from_secs(5));
        }
    }

    /// Waits until a running member reports a leader; returns the leader's index.
    pub fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster never elected a leader"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the leader, as the running members see it.
    pub fn leader(&self) -> Option<usize> {
        let out = self
            .ns
            .command("etcdctl")
            .arg(format!("--endpoints={}", self.running()))
            .args(["--command-timeout=2s", "endpoint", "status", "-w", "json"])
            .output()
            .ok()?;
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        for status in statuses.as_array()? {
            let s = &status["Status"];
            let (me, leader) = (&s["header"]["member_id"], &s["leader"]);
            if me.is_u64() && me == leader {
                let endpoint = status["Endpoint"].as_str()?;
                return self
                    .members
                    .iter()
                    .position(|m| endpoint.ends_with(&m.client.to_string()));
            }
        }
        None
    }

    /// Makes member `i` the leader (`etcdctl move-leader`), so that a test can kill the
    /// leader and the member its clients follow (they start with the first) at once.
    pub fn make_leader(&self, i: usize) {
        let leader = self.wait_leader();
        if leader == i {
            return;
        }
        let out = self.ctl(&["member", "list", "-w", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("etcdctl member list: {e}"));
        let url = self.members[i].url();
        let id = list["members"]
            .as_array()
            .and_then(|members| {
                members.iter().find(|m| {
                    m["clientURLs"]
                        .as_array()
                        .is_some_and(|urls| urls.iter().any(|u| u == url.as_str()))
                })
            })
            .and_then(|m| m["ID"].as_u64())
            .unwrap_or_else(|| panic!("member {url} not in {list}"));
        self.ctl_on(
            &self.members[leader].url(),
            &["move-leader", &format!("{id:x}")],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.leader() != Some(i) {
            assert!(
                Instant::now() < deadline,
                "member {i} never became the leader"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `etcdctl ARGS` against every running member; panics if it fails.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_on(&self.running(), args)
    }

    /// Runs `etcdctl ARGS` against `endpoints`; panics if it fails.
    fn ctl_on(&self, endpoints: &str, args: &[&str]) -> Output {
        let out = self
            .ns
            .command("etcdctl")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run etcdctl: {e}"));
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `etcdctl put KEY VALUE`.
    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }
}
