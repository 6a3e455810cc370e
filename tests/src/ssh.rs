//! Peers for the SSH gateway: OpenSSH's sshd inside VM namespaces, keys made with
//! ssh-keygen, the OpenSSH client, and a `vmedge ssh-gateway` process.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::edge::{path_arg, start_vmedge, wait_listening, Process};
use crate::{run, Netns};

/// A key pair made by ssh-keygen.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// The private key file.
    pub private: PathBuf,
    /// `<type> <base64>` (no comment).
    pub public: String,
}

/// `ssh-keygen -t TYPE [-b BITS]` into `dir/name`.
pub fn keygen(dir: &Path, name: &str, kind: &str, bits: Option<u32>) -> KeyPair {
    let private = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-N", "", "-C", name, "-t", kind, "-f"])
        .arg(&private);
    if let Some(bits) = bits {
        cmd.args(["-b", &bits.to_string()]);
    }
    run(&mut cmd);
    KeyPair {
        public: public_line(&private.with_extension("pub")),
        private,
    }
}

/// The `<type> <base64>` of a public key file.
pub fn public_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Signs `key`'s public half as a host certificate for `principal` with `ca`.
pub fn sign_host_key(ca: &KeyPair, key: &KeyPair, principal: &str) -> PathBuf {
    run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca.private)
        .args(["-I", "vm-host", "-h", "-n", principal, "-V", "-5m:+1h"])
        .arg(key.private.with_extension("pub")));
    let name = format!(
        "{}-cert.pub",
        key.private
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("key")
    );
    key.private.with_file_name(name)
}

/// An sshd in a VM namespace.
#[derive(Debug)]
pub struct Sshd {
    /// Its host key.
    pub host_key: KeyPair,
    /// Its log (`-E`): "Accepted publickey ... ID <key id>" lines.
    pub log: PathBuf,
    _process: Process,
}

/// How an sshd is set up.
#[derive(Debug, Default)]
pub struct SshdOptions<'a> {
    /// `TrustedUserCAKeys`: the gateway's user CA public key line.
    pub user_ca: Option<&'a str>,
    /// Keys in root's `authorized_keys` (a static gateway key).
    pub authorized_keys: Vec<String>,
    /// A host certificate signed by this CA, for this principal.
    pub host_cert: Option<(&'a KeyPair, &'a str)>,
}

impl Sshd {
    /// Starts `sshd -D` listening on port 22 of each of `addrs` in `ns`, its files in `dir`.
    pub fn start(ns: &Netns, dir: &Path, addrs: &[Ipv6Addr], options: SshdOptions<'_>) -> Sshd {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let _ = std::fs::create_dir_all("/run/sshd"); // sshd's privilege separation dir
        let host_key = keygen(dir, "ssh_host_ed25519_key", "ed25519", None);
        let mut config: String = addrs
            .iter()
            .map(|a| format!("ListenAddress [{a}]:22\n"))
            .collect();
        config.push_str(&format!(
            "HostKey {}\nPidFile {}\nLogLevel VERBOSE\nUsePAM no\n\
             StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nAllowTcpForwarding yes\nPrintMotd no\n\
             AcceptEnv LANG VMEDGE_*\nSubsystem sftp internal-sftp\nMaxStartups 200\n",
            host_key.private.display(),
            dir.join("sshd.pid").display(),
        ));
        if let Some(ca) = options.user_ca {
            let path = dir.join("user_ca.pub");
            std::fs::write(&path, format!("{ca}\n")).unwrap_or_else(|e| panic!("{e}"));
            config.push_str(&format!("TrustedUserCAKeys {}\n", path.display()));
        }
        let keys = dir.join("authorized_keys");
        std::fs::write(&keys, options.authorized_keys.join("\n") + "\n")
            .unwrap_or_else(|e| panic!("{e}"));
        config.push_str(&format!("AuthorizedKeysFile {}\n", keys.display()));
        if let Some((ca, principal)) = options.host_cert {
            let cert = sign_host_key(ca, &host_key, principal);
            config.push_str(&format!("HostCertificate {}\n", cert.display()));
        }
        let config_path = dir.join("sshd_config");
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join("sshd.log");
        let child = ns
            .command("/usr/sbin/sshd")
            .args(["-D", "-f"])
            .arg(&config_path)
            .arg("-E")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start sshd: {e}"));
        let process = Process::new(child, "sshd");
        for addr in addrs {
            wait_listening(ns, SocketAddr::from((*addr, 22)), "sshd");
        }
        Sshd {
            host_key,
            log,
            _process: process,
        }
    }

    /// sshd's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `BIN ssh-gateway --config CONFIG` in `ns` and waits until `listen` accepts.
pub fn gateway(bin: &str, ns: &Netns, config: &Path, listen: SocketAddr) -> Process {
    // VMEDGE_TEST_LOG (e.g. "warn,russh=debug") turns the gateway's logs up when debugging.
    let level = std::env::var("VMEDGE_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let args = [
        "--log-level",
        &level,
        "ssh-gateway",
        "--config",
        path_arg(config),
    ];
    start_vmedge(bin, ns, &args, listen, "vmedge ssh-gateway")
}

/// The OpenSSH client options every test uses: this key only, no config, no agent, no
/// host key prompts (the gateway's host key is not what these tests check).
pub fn client_options(key: &Path, port: u16, known_hosts: &Path) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-o".to_string(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-i".to_string(),
        key.display().to_string(),
        "-p".to_string(),
        port.to_string(),
    ])
    .collect()
}

/// `ssh [options] USER@HOST ARGS...` in `ns`, stdin from `/dev/null`.
pub fn ssh(ns: &Netns, options: &[String], target: &str, args: &[&str]) -> Output {
    ns.command("ssh")
        .args(options)
        .arg(target)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ssh: {e}"))
}

/// Runs a shell line in `ns` (for pipes and redirections around ssh, scp and sftp).
pub fn shell(ns: &Netns, line: &str) -> Output {
    ns.command("sh")
        .args(["-c", line])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh: {e}"))
}
