//! The gateway's SSH connection to a VM: `[public_ipv6]:22`, the VM's host key checked
//! (never trusted on first use), logged in as the login user with a per-connection
//! certificate from the gateway's user CA, or a static key.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use russh::client;
use russh::client::ChannelOpenHandle;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{self, HashAlg};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelId};
use vmedge_model::{Vm, VmId};

use crate::bridge::Backlogs;
use crate::keys::{CertSubject, UserCa};

/// How the gateway proves itself to a VM's sshd.
#[derive(Debug, Clone)]
pub enum Login {
    /// A fresh certificate from this CA per connection (the VM trusts it).
    Certificate(Arc<UserCa>),
    /// One static key (images without the CA list it in `authorized_keys`).
    StaticKey(Arc<PrivateKey>),
}

/// Everything about reaching VMs.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The user logged in as on every VM.
    pub login_user: String,
    /// How to log in.
    pub login: Login,
    /// Host CAs whose host certificates (principal = VM id) are accepted.
    pub host_cas: Vec<PublicKey>,
    /// The only addresses dialled.
    pub vm_prefixes: Vec<IpNet>,
    /// TCP connect, SSH handshake and login together.
    pub connect_timeout: Duration,
    /// Lifetime of a login certificate.
    pub cert_lifetime: Duration,
    /// The port sshd listens on in VMs.
    pub port: u16,
    /// russh client settings (keepalives, windows, algorithms).
    pub client: Arc<client::Config>,
}

/// Why a VM could not be reached. [`UpstreamError::to_user`] is what the user is told.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The VM's address is outside the configured VM prefixes: never dialled.
    #[error("address {0} is outside the VM prefixes")]
    OutsidePrefixes(IpAddr),
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The VM's sshd.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Connect, handshake and login took longer than the connect timeout.
    #[error("no answer from {0} in time")]
    Timeout(SocketAddr),
    /// The VM's host key is not one the gateway trusts.
    #[error("host key refused: {0}")]
    HostKey(String),
    /// The VM's sshd refused the gateway's login.
    #[error("the VM's sshd refused the gateway's login as {0}")]
    Login(String),
    /// Any other SSH failure.
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
    /// The certificate could not be made.
    #[error("{0}")]
    Key(#[from] crate::keys::KeyError),
}

impl UpstreamError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::OutsidePrefixes(_) => "outside_prefixes",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::HostKey(_) => "host_key",
            UpstreamError::Login(_) => "login",
            UpstreamError::Ssh(_) | UpstreamError::Key(_) => "ssh",
        }
    }

    /// One line for the user (who has authenticated, so may know the VM exists).
    pub fn to_user(&self, vm: &VmId) -> String {
        match self {
            UpstreamError::HostKey(why) => format!(
                "vmedge: VM {vm} presented a host key the gateway does not trust ({why}); refusing to connect"
            ),
            UpstreamError::Login(_) => {
                format!("vmedge: VM {vm} refused the gateway's login (does its image trust the gateway CA?)")
            }
            UpstreamError::OutsidePrefixes(_) => format!("vmedge: VM {vm} is not reachable"),
            _ => format!("vmedge: VM {vm} is not answering on port 22"),
        }
    }
}

/// Where channels the VM opens towards the user (`ssh -R` connections) are sent.
pub trait ForwardedChannels: Send + Sync + 'static {
    /// A connection came in on a port the user forwarded; `reply` accepts or rejects it.
    fn forwarded(
        &self,
        channel: Channel<client::Msg>,
        open: ForwardedOpen,
        reply: ChannelOpenHandle,
    );
}

/// The addresses of a forwarded connection, as the VM's sshd gave them.
#[derive(Debug, Clone)]
pub struct ForwardedOpen {
    /// The forwarded address (as the user asked for it).
    pub connected_address: String,
    /// The forwarded port.
    pub connected_port: u32,
    /// Who connected.
    pub originator_address: String,
    /// Their port.
    pub originator_port: u32,
}

/// russh's client handler for one VM connection.
pub struct VmHandler {
    vm: VmId,
    host_keys: Vec<KeyData>,
    host_cas: Vec<ssh_key::Fingerprint>,
    refusal: Arc<Mutex<Option<String>>>,
    forwards: Arc<dyn ForwardedChannels>,
    from_vm: Arc<Backlogs>,
}

impl VmHandler {
    /// Whether the VM's sshd proved an identity the gateway trusts; `Err` says why not.
    fn verify(&self, offered: &PublicKeyOrCertificate) -> Result<(), String> {
        match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if self.host_keys.iter().any(|k| k == key.key_data()) {
                    Ok(())
                } else if self.host_keys.is_empty() {
                    Err(format!(
                        "{} is not a host certificate and the VM lists no ssh_host_keys",
                        key.fingerprint(HashAlg::Sha256)
                    ))
                } else {
                    Err(format!(
                        "{} is not among the VM's ssh_host_keys",
                        key.fingerprint(HashAlg::Sha256)
                    ))
                }
            }
            PublicKeyOrCertificate::Certificate(cert) => {
                if self.host_cas.is_empty() {
                    return Err("a host certificate, but no host CA is configured".into());
                }
                cert.validate(&self.host_cas).map_err(|_| {
                    "host certificate not signed by the host CA, or expired".to_string()
                })?;
                if cert.cert_type() != CertType::Host {
                    return Err("a user certificate where a host certificate belongs".into());
                }
                let (hyphenated, hex) = (self.vm.to_string(), self.vm.hex().to_string());
                if !cert
                    .valid_principals()
                    .iter()
                    .any(|p| *p == hyphenated || *p == hex)
                {
                    return Err(format!(
                        "host certificate is not for principal {hyphenated}"
                    ));
                }
                Ok(())
            }
        }
    }
}

impl client::Handler for VmHandler {
    type Error = russh::Error;

    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        self.from_vm.window(channel)
    }

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match self.verify(offered) {
            Ok(()) => Ok(true),
            Err(why) => {
                tracing::warn!(vm = %self.vm, "VM host key refused: {why}");
                if let Ok(mut slot) = self.refusal.lock() {
                    *slot = Some(why);
                }
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Handed off: opening the user's side is a round trip, never awaited here.
        let open = ForwardedOpen {
            connected_address: connected_address.to_string(),
            connected_port,
            originator_address: originator_address.to_string(),
            originator_port,
        };
        self.forwards.forwarded(channel, open, reply);
        Ok(())
    }
}

/// A logged-in connection to a VM.
pub type VmConnection = client::Handle<VmHandler>;

/// Connects to `vm`'s sshd and logs in for `subject`. `from_vm` holds the backlogs of the
/// VM's channels towards the user: a channel's window is withheld while its backlog is high
/// (bridge.rs).
pub async fn connect(
    config: &UpstreamConfig,
    vm: &Vm,
    subject: &CertSubject<'_>,
    forwards: Arc<dyn ForwardedChannels>,
    from_vm: Arc<Backlogs>,
) -> Result<VmConnection, UpstreamError> {
    let ip = IpAddr::V6(vm.public_ipv6);
    if !config.vm_prefixes.iter().any(|p| p.contains(&ip)) {
        return Err(UpstreamError::OutsidePrefixes(ip));
    }
    let addr = SocketAddr::new(ip, config.port);
    match tokio::time::timeout(
        config.connect_timeout,
        connect_inner(config, vm, addr, subject, forwards, from_vm),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout(addr)),
    }
}

async fn connect_inner(
    config: &UpstreamConfig,
    vm: &Vm,
    addr: SocketAddr,
    subject: &CertSubject<'_>,
    forwards: Arc<dyn ForwardedChannels>,
    from_vm: Arc<Backlogs>,
) -> Result<VmConnection, UpstreamError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let local = tcp
        .local_addr()
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    let host_keys = vm
        .ssh_host_keys
        .iter()
        .flatten()
        .filter_map(|k| PublicKey::from_openssh(&k.public_key).ok())
        .map(|k| k.key_data().clone())
        .collect();
    let refusal = Arc::new(Mutex::new(None));
    let handler = VmHandler {
        vm: vm.id,
        host_keys,
        host_cas: config
            .host_cas
            .iter()
            .map(|k| k.fingerprint(HashAlg::Sha256))
            .collect(),
        refusal: refusal.clone(),
        forwards,
        from_vm,
    };
    let mut handle = match client::connect_stream(config.client.clone(), tcp, handler).await {
        Ok(h) => h,
        Err(e) => {
            let why = refusal.lock().ok().and_then(|mut s| s.take());
            return Err(match why {
                Some(why) => UpstreamError::HostKey(why),
                None => UpstreamError::Ssh(e),
            });
        }
    };
    let user = config.login_user.clone();
    let result = match &config.login {
        Login::Certificate(ca) => {
            let cred = ca.issue(subject, &user, local.ip(), config.cert_lifetime)?;
            handle
                .authenticate_openssh_cert(user.clone(), Arc::new(cred.key), cred.certificate)
                .await?
        }
        Login::StaticKey(key) => {
            let hash = handle.best_supported_rsa_hash().await?.flatten();
            handle
                .authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await?
        }
    };
    if !result.success() {
        return Err(UpstreamError::Login(user));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::certificate::Builder;
    use russh::keys::ssh_key::Algorithm;

    struct NoForwards;
    impl ForwardedChannels for NoForwards {
        fn forwarded(&self, _: Channel<client::Msg>, _: ForwardedOpen, _: ChannelOpenHandle) {}
    }

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    fn handler(vm: VmId, listed: Vec<KeyData>, ca: Option<&PrivateKey>) -> VmHandler {
        VmHandler {
            vm,
            host_keys: listed,
            host_cas: ca
                .map(|c| c.public_key().fingerprint(HashAlg::Sha256))
                .into_iter()
                .collect(),
            refusal: Arc::default(),
            from_vm: Arc::new(Backlogs::new(crate::bridge::VM_WINDOW)),
            forwards: Arc::new(NoForwards),
        }
    }

    fn host_cert(
        host: &PrivateKey,
        ca: &PrivateKey,
        principal: &str,
        kind: CertType,
    ) -> Certificate {
        let now = std::time::SystemTime::now();
        let mut b = Builder::new_with_validity_times(
            vec![0; 16],
            host.public_key().key_data().clone(),
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        )
        .unwrap();
        b.cert_type(kind)
            .unwrap()
            .valid_principal(principal)
            .unwrap();
        b.sign(ca).unwrap()
    }

    use russh::keys::Certificate;

    #[test]
    fn host_keys_are_listed_keys_or_certificates_for_the_vm() {
        let vm = VmId::parse("6f1c2d3e-0000-4000-8000-0000000000aa").unwrap();
        let (host, other, ca, rogue_ca) = (key(), key(), key(), key());
        let listed = handler(vm, vec![host.public_key().key_data().clone()], None);
        assert!(listed.verify(&host.public_key().clone().into()).is_ok());
        let err = listed
            .verify(&other.public_key().clone().into())
            .unwrap_err();
        assert!(err.contains("not among"), "{err}");

        let by_ca = handler(vm, Vec::new(), Some(&ca));
        let good = host_cert(&host, &ca, &vm.to_string(), CertType::Host);
        assert!(by_ca.verify(&good.into()).is_ok());
        let hex = host_cert(&host, &ca, &vm.hex().to_string(), CertType::Host);
        assert!(by_ca.verify(&hex.into()).is_ok());
        let other_vm = host_cert(
            &host,
            &ca,
            "6f1c2d3e-0000-4000-8000-0000000000bb",
            CertType::Host,
        );
        assert!(by_ca
            .verify(&other_vm.into())
            .unwrap_err()
            .contains("principal"));
        let rogue = host_cert(&host, &rogue_ca, &vm.to_string(), CertType::Host);
        assert!(by_ca.verify(&rogue.into()).is_err());
        let user_cert = host_cert(&host, &ca, &vm.to_string(), CertType::User);
        assert!(by_ca.verify(&user_cert.into()).is_err());
        // No listed keys and a bare key: refused, no trust on first use.
        assert!(by_ca.verify(&host.public_key().clone().into()).is_err());
    }
}
