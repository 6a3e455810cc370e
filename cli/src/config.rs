//! The one TOML config file (DESIGN.md, "The command line").
//!
//! Every key has a default that suits `vmedge up` on loopback. Values are checked while
//! they are read, so a bad value, like an unknown key, is reported by the TOML reader
//! with its line and column. Relative paths in a config file are relative to that file's
//! folder; the built-in defaults are relative to the working directory.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// Where the state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySource {
    /// `file:PATH`: a JSON state file, watched.
    File(PathBuf),
    /// `etcd:URL,URL`: an etcd cluster.
    Etcd(Vec<String>),
}

impl fmt::Display for RegistrySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistrySource::File(p) => write!(f, "file:{}", p.display()),
            RegistrySource::Etcd(urls) => write!(f, "etcd:{}", urls.join(",")),
        }
    }
}

impl std::str::FromStr for RegistrySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("\"file:\" needs a path, e.g. file:examples/state.json".into());
            }
            return Ok(RegistrySource::File(path.into()));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
            if let Some(tls) = urls.iter().find(|u| u.starts_with("https://")) {
                return Err(format!(
                    "{tls:?}: TLS to etcd is not supported yet: use http:// on a private network, or a local `etcd grpc-proxy` that speaks TLS to the cluster"
                ));
            }
            if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
                return Err(format!(
                    "{bad:?} is not an etcd endpoint URL (http://host:2379)"
                ));
            }
            return Ok(RegistrySource::Etcd(urls));
        }
        Err(format!(
            "{s:?}: expected \"file:PATH\" or \"etcd:URL[,URL...]\""
        ))
    }
}

impl<'de> Deserialize<'de> for RegistrySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The stack domain: services are `<svc>--<vmid>.proxy.<domain>`, the gateway `ssh.<domain>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain(String);

impl Domain {
    /// The domain, lowercase, without a trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Domain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match vmedge_model::DomainPattern::parse(&text) {
            Ok(p) if !p.is_wildcard() => Ok(Domain(p.base().to_string())),
            Ok(_) => Err(serde::de::Error::custom(format!(
                "{text:?}: the domain cannot be a wildcard"
            ))),
            Err(e) => Err(serde::de::Error::custom(format!("{text:?} {e}"))),
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"30s\" or \"2m\": {e}"
        ))
    })
}

fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err(serde::de::Error::custom(format!(
            "{text:?} is not an http:// or https:// URL"
        )));
    }
    Ok(Some(text))
}

fn vm_prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let nets = prefixes(d)?;
    if nets.is_empty() {
        return Err(serde::de::Error::custom(
            "at least one VM prefix is needed: nothing else is ever dialled",
        ));
    }
    Ok(nets)
}

fn prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    let mut nets = Vec::with_capacity(texts.len());
    for text in texts {
        let net: IpNet = text
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a CIDR prefix")))?;
        if net.trunc() != net {
            return Err(serde::de::Error::custom(format!(
                "{text:?} has host bits set; did you mean {}?",
                net.trunc()
            )));
        }
        nets.push(net);
    }
    Ok(nets)
}

/// The whole config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Stack domain.
    pub domain: Domain,
    /// Where the state comes from.
    pub registry: RegistrySource,
    /// Generated keys and certificates, kept across restarts.
    pub state_dir: PathBuf,
    /// The only addresses ever dialled or answered for.
    #[serde(deserialize_with = "vm_prefixes")]
    pub vm_prefixes: Vec<IpNet>,
    /// The control plane's wake hook: POST {"vm_id": "..."}.
    #[serde(deserialize_with = "http_url")]
    pub wake_url: Option<String>,
    /// `[edge]`
    pub edge: EdgeConfig,
    /// `[ssh]`
    pub ssh: SshConfig,
    /// `[dns]`
    pub dns: DnsConfig,
    /// `[worker]`
    pub worker: WorkerConfig,
}

/// `[edge]`: the HTTP(S) proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Plain HTTP/1.1 and h2c listeners.
    pub http: Vec<SocketAddr>,
    /// TLS listeners (h2 and http/1.1 by ALPN).
    pub https: Vec<SocketAddr>,
    /// /metrics, /activity, /healthz.
    pub admin: SocketAddr,
    /// PEM certificate chain for `*.proxy.<domain>`; self-signed in state_dir when absent.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// How long a request waits for a paused VM to wake.
    #[serde(deserialize_with = "duration")]
    pub wake_timeout: Duration,
    /// How long connecting to a VM may take (then 504).
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long a VM may stay silent in the middle of an exchange (each read or write).
    #[serde(deserialize_with = "duration")]
    pub upstream_timeout: Duration,
    /// How long a client connection may wait for its next request (then closed).
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// How long a client may stay silent in the middle of a request (each read).
    #[serde(deserialize_with = "duration")]
    pub client_timeout: Duration,
    /// How long a request's whole header may take to arrive.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Requests per second each VM may receive (bursts of twice that); 0 for no limit.
    pub rate_limit: u32,
    /// The largest request header accepted (then 431), in bytes.
    pub max_header_bytes: usize,
    /// Streams at once on one h2c connection to a VM service; another connection is
    /// opened when all are full.
    pub h2_streams_per_connection: usize,
    /// Worker threads; 0 for one per core.
    pub threads: usize,
    /// How long open requests may finish after SIGTERM.
    #[serde(deserialize_with = "duration")]
    pub grace_period: Duration,
}

/// `[ssh]`: the SSH gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// SSH listeners.
    pub listen: Vec<SocketAddr>,
    /// /metrics, /healthz.
    pub admin: SocketAddr,
    /// The user the gateway logs in as on the VM.
    pub login_user: String,
    /// A private key to log in to VMs with, for images without the gateway CA; by default
    /// each login uses a fresh certificate from the gateway's user CA.
    pub static_key: Option<PathBuf>,
    /// Host CAs (OpenSSH public key lines): a VM host certificate they signed for the VM id
    /// is trusted; otherwise a VM's host key must be one of its `ssh_host_keys`.
    pub host_ca: Vec<String>,
    /// sshd's port inside VMs.
    pub vm_port: u16,
    /// Connecting and logging in to a VM.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long a session waits for a paused VM to run.
    #[serde(deserialize_with = "duration")]
    pub wake_timeout: Duration,
    /// A session with no channel data either way for this long is closed; "0s": never.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Keepalives to users and to VMs (three unanswered: the connection is dropped).
    #[serde(deserialize_with = "duration")]
    pub keepalive_interval: Duration,
    /// Authentication attempts per connection.
    pub max_auth_attempts: usize,
    /// Authentication failures one source address may have per minute; 0: no limit.
    pub auth_failures_per_minute: u32,
    /// Concurrent sessions per user.
    pub max_sessions_per_user: usize,
    /// How long open sessions may go on after SIGTERM.
    #[serde(deserialize_with = "duration")]
    pub grace_period: Duration,
}

/// `[dns]`: the DNS gate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP listeners.
    pub listen: Vec<SocketAddr>,
    /// /metrics, /healthz.
    pub admin: SocketAddr,
    /// Resolvers the gate asks.
    pub upstreams: Vec<SocketAddr>,
    /// Queries per second each VM may ask (bursts of twice that); 0 for no limit.
    pub rate_limit: u32,
    /// An answered address stays in an fqdn set at least this long, whatever its TTL.
    #[serde(deserialize_with = "duration")]
    pub fqdn_floor: Duration,
    /// Added to every fqdn set timeout.
    #[serde(deserialize_with = "duration")]
    pub fqdn_grace: Duration,
    /// Private prefixes answers may still carry (others are dropped: DNS rebinding).
    #[serde(deserialize_with = "prefixes")]
    pub rebind_allow: Vec<IpNet>,
}

/// `[worker]`: the worker agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// This worker's name, as VMs' `worker` field names it.
    pub name: String,
    /// The address VMs of this worker must use for DNS.
    pub dns_gate: IpAddr,
    /// /metrics, /healthz of the worker agent.
    pub admin: SocketAddr,
    /// How often the live table is compared with what was applied (and a failed sync retried).
    #[serde(deserialize_with = "duration")]
    pub drift_interval: Duration,
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().filter_map(|a| a.parse().ok()).collect()
}

fn addr(a: &str) -> SocketAddr {
    a.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: Domain("localhost".into()),
            registry: RegistrySource::File("examples/state.json".into()),
            state_dir: ".vmedge".into(),
            vm_prefixes: vec!["fd5e:ed00::/32".parse().unwrap_or_default()],
            wake_url: None,
            edge: EdgeConfig::default(),
            ssh: SshConfig::default(),
            dns: DnsConfig::default(),
            worker: WorkerConfig::default(),
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            http: addrs(&["127.0.0.1:8080", "[::1]:8080"]),
            https: addrs(&["127.0.0.1:8443", "[::1]:8443"]),
            admin: addr("127.0.0.1:9180"),
            tls_cert: None,
            tls_key: None,
            wake_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            client_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(60),
            rate_limit: 0,
            max_header_bytes: 32 * 1024,
            h2_streams_per_connection: 128,
            threads: 0,
            grace_period: Duration::from_secs(5),
        }
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            listen: addrs(&["127.0.0.1:2222", "[::1]:2222"]),
            admin: addr("127.0.0.1:9181"),
            login_user: "root".into(),
            static_key: None,
            host_ca: Vec::new(),
            vm_port: 22,
            connect_timeout: Duration::from_secs(10),
            wake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::ZERO,
            keepalive_interval: Duration::from_secs(30),
            max_auth_attempts: 6,
            auth_failures_per_minute: 30,
            max_sessions_per_user: 100,
            grace_period: Duration::from_secs(30),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: addrs(&["[::1]:5353"]),
            admin: addr("127.0.0.1:9182"),
            upstreams: addrs(&["127.0.0.53:53"]),
            rate_limit: 500,
            fqdn_floor: Duration::from_secs(60),
            fqdn_grace: Duration::from_secs(30),
            rebind_allow: Vec::new(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: "worker-1".into(),
            dns_gate: "fd5e:ed00::53".parse().unwrap_or(IpAddr::from([0u16; 8])),
            admin: addr("127.0.0.1:9183"),
            drift_interval: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Reads and checks a config file; errors name the file, the key and its line.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config file", path.display()))?;
        let mut config =
            Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        config.resolve_paths(base);
        Ok(config)
    }

    /// The config file given on the command line, or the built-in defaults.
    pub fn load_or_default(path: Option<&Path>) -> anyhow::Result<Config> {
        path.map_or_else(|| Ok(Config::default()), Config::load)
    }

    /// Parses config text (paths left as written).
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Rules across keys, which the TOML reader cannot check.
    fn check(&self) -> Result<(), String> {
        if self.edge.tls_cert.is_some() != self.edge.tls_key.is_some() {
            return Err("[edge] tls_cert and tls_key go together: give both or neither".into());
        }
        if self.edge.h2_streams_per_connection == 0 {
            return Err("[edge] h2_streams_per_connection must be at least 1".into());
        }
        if self.ssh.login_user.is_empty() {
            return Err("[ssh] login_user must not be empty".into());
        }
        if self.ssh.keepalive_interval.is_zero() {
            return Err("[ssh] keepalive_interval must be more than 0s".into());
        }
        if self.ssh.max_auth_attempts == 0 || self.ssh.max_sessions_per_user == 0 {
            return Err(
                "[ssh] max_auth_attempts and max_sessions_per_user must be at least 1".into(),
            );
        }
        if self.worker.name.is_empty() {
            return Err("[worker] name must not be empty".into());
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let RegistrySource::File(p) = &mut self.registry {
            resolve(p);
        }
        resolve(&mut self.state_dir);
        if let Some(p) = &mut self.edge.tls_cert {
            resolve(p);
        }
        if let Some(p) = &mut self.edge.tls_key {
            resolve(p);
        }
        if let Some(p) = &mut self.ssh.static_key {
            resolve(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.domain.as_str(), "localhost");
        assert_eq!(
            c.registry,
            RegistrySource::File("examples/state.json".into())
        );
        assert_eq!(
            c.vm_prefixes,
            vec!["fd5e:ed00::/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(c.edge.http, addrs(&["127.0.0.1:8080", "[::1]:8080"]));
        assert_eq!(c.edge.wake_timeout, Duration::from_secs(30));
        assert_eq!(c.edge.h2_streams_per_connection, 128);
        assert_eq!(c.ssh.login_user, "root");
        assert_eq!(c.dns.upstreams, addrs(&["127.0.0.53:53"]));
        assert_eq!(
            c.worker.dns_gate,
            "fd5e:ed00::53".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../examples/vmedge.toml");
        let c = Config::parse(text).unwrap();
        assert!(
            c.vm_prefixes.contains(&"::1/128".parse().unwrap()),
            "the demo VM at ::1 is allowed"
        );
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let cases = [
            (
                "domain = \"x\"\nbogus = 1\n",
                "line 2",
                "unknown field `bogus`",
            ),
            (
                "[edge]\nhttp = [\"127.0.0.1:80\"]\nadmn = \"127.0.0.1:1\"\n",
                "line 3",
                "unknown field `admn`",
            ),
            (
                "registry = \"ftp:x\"\n",
                "line 1",
                "expected \"file:PATH\" or \"etcd:URL[,URL...]\"",
            ),
            (
                "registry = \"etcd:http://a:2379,https://b:2379\"\n",
                "line 1",
                "TLS to etcd is not supported yet",
            ),
            (
                "registry = \"etcd:a:2379\"\n",
                "line 1",
                "\"a:2379\" is not an etcd endpoint URL",
            ),
            (
                "\n[edge]\nwake_timeout = \"soon\"\n",
                "line 3",
                "is not a duration",
            ),
            (
                "vm_prefixes = [\"fd5e:ed00::1/32\"]\n",
                "line 1",
                "did you mean fd5e:ed00::/32?",
            ),
            ("vm_prefixes = []\n", "line 1", "at least one VM prefix"),
            (
                "domain = \"*.example.com\"\n",
                "line 1",
                "cannot be a wildcard",
            ),
            (
                "[dns]\nlisten = [\"5353\"]\n",
                "line 2",
                "invalid socket address",
            ),
            (
                "wake_url = \"127.0.0.1:9000/wake\"\n",
                "line 1",
                "is not an http:// or https:// URL",
            ),
        ];
        for (text, line, why) in cases {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(line) && e.contains(why), "{text:?}:\n{e}");
        }
        let e = Config::parse("[edge]\ntls_cert = \"a.pem\"\n").unwrap_err();
        assert!(e.contains("tls_cert and tls_key go together"), "{e}");
        let e = Config::parse("[edge]\nh2_streams_per_connection = 0\n").unwrap_err();
        assert!(
            e.contains("h2_streams_per_connection must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmedge.toml");
        std::fs::write(
            &file,
            "registry = \"file:state.json\"\nstate_dir = \"/var/lib/vmedge\"\n",
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(
            c.registry,
            RegistrySource::File(dir.path().join("state.json"))
        );
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/vmedge"));
    }
}
