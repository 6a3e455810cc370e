//! One user connection: russh's server handler. Authentication decides which VM; once a
//! key is accepted the VM connection is made in the background ([`Link`]) and every
//! channel the user opens is bridged onto it by a task of its own. No callback here waits
//! on the VM, except `tcpip-forward`, whose reply russh takes from the callback's return
//! value (bounded by the connect timeout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use russh::keys::ssh_key::Algorithm;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, PublicKeyOffer, VerifiedPublicKey};
use russh::{client, Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::watch;
use tracing::Instrument;
use vmedge_model::VmStatus;

use crate::access::{self, Denied, Grant};
use crate::bridge::{self, Activity, Backlogs, PumpContext, UserEnd, VmEnd};
use crate::keys::{self, CertSubject};
use crate::server::Shared;
use crate::upstream::{self, ForwardedChannels, ForwardedOpen, VmConnection};

/// The state of a session's connection to its VM.
#[derive(Clone)]
pub enum Link {
    /// Not yet decided (connecting, or waiting for the VM to run).
    Pending,
    /// Logged in.
    Ready(Arc<VmConnection>),
    /// Will not happen; the line tells the user why.
    Failed(Arc<str>),
}

/// What outlives the handler: the connection task reads it when the user has gone.
pub struct ConnectionState {
    /// The accepted user and VM, once authenticated.
    pub grant: std::sync::Mutex<Option<Grant>>,
    /// The VM connection.
    pub link: std::sync::Mutex<Option<watch::Receiver<Link>>>,
    /// Channel activity, for the idle timeout.
    pub activity: Arc<Activity>,
    /// Backlogs of the user's channels (bytes on their way to the VM), for their windows.
    pub to_vm: Arc<Backlogs>,
    /// Backlogs of the VM's channels (bytes on their way to the user), for their windows.
    pub from_vm: Arc<Backlogs>,
}

impl Default for ConnectionState {
    fn default() -> Self {
        ConnectionState {
            grant: Default::default(),
            link: Default::default(),
            activity: Default::default(),
            to_vm: Arc::new(Backlogs::new(bridge::USER_WINDOW)),
            from_vm: Arc::new(Backlogs::new(bridge::VM_WINDOW)),
        }
    }
}

/// russh's server handler for one connection.
pub struct UserConnection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    id: String,
    state: Arc<ConnectionState>,
    link: Option<watch::Receiver<Link>>,
}

impl UserConnection {
    pub(crate) fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        id: String,
        state: Arc<ConnectionState>,
    ) -> Self {
        UserConnection {
            shared,
            peer,
            id,
            state,
            link: None,
        }
    }

    /// The decision for a key on `user`, with the refusal counted and logged.
    fn check(
        &mut self,
        user: &str,
        key: &russh::keys::PublicKey,
        algorithm: &Algorithm,
        signed: bool,
    ) -> Result<Grant, Denied> {
        let fingerprint = keys::fingerprint(key);
        let decision =
            if !keys::user_algorithm_accepted(algorithm) || !keys::user_key_strong_enough(key) {
                Err(Denied::KeyType)
            } else {
                access::decide(&self.shared.registry.load(), user, &fingerprint)
            };
        if let Err(why) = decision {
            self.shared.metrics.auth_failure(why.as_str());
            self.shared.auth_failed(self.peer.ip());
            tracing::info!(
                session = %self.id, peer = %self.peer, user, %fingerprint, algorithm = %algorithm,
                reason = why.as_str(), signed, "key refused"
            );
        }
        decision
    }

    fn pump_context(&self, user: server::Handle) -> PumpContext {
        PumpContext {
            metrics: self.shared.metrics.clone(),
            activity: self.state.activity.clone(),
            user,
            to_vm: self.state.to_vm.clone(),
            from_vm: self.state.from_vm.clone(),
        }
    }
}

/// Waits until the VM connection is decided.
async fn ready(link: &mut watch::Receiver<Link>) -> Result<Arc<VmConnection>, Arc<str>> {
    let decided = link.wait_for(|l| !matches!(l, Link::Pending)).await;
    match decided.as_deref() {
        Ok(Link::Ready(vm)) => Ok(vm.clone()),
        Ok(Link::Failed(why)) => Err(why.clone()),
        _ => Err("vmedge: the session is closing".into()),
    }
}

impl server::Handler for UserConnection {
    type Error = russh::Error;

    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        self.state.to_vm.window(channel)
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            match self.check(user, offer.public_key, offer.algorithm, false) {
                Ok(_) => Auth::Accept,
                Err(_) => Auth::reject(),
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let grant = match self.check(user, key.public_key, key.algorithm, true) {
            Ok(grant) => grant,
            Err(_) => return Ok(Auth::reject()),
        };
        if !self.shared.sessions.try_add(&grant.user_id) {
            self.shared.metrics.auth_failure("session_limit");
            tracing::warn!(session = %self.id, user_id = %grant.user_id, "refused: the user has too many sessions open");
            return Ok(Auth::reject());
        }
        tracing::info!(
            session = %self.id, peer = %self.peer, vm = %grant.vm, user_id = %grant.user_id,
            fingerprint = %grant.fingerprint, algorithm = %key.algorithm, "authenticated"
        );
        if let Ok(mut slot) = self.state.grant.lock() {
            *slot = Some(grant);
        }
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, session: &mut server::Session) -> Result<(), Self::Error> {
        self.shared.metrics.session_opened();
        let grant = self.state.grant.lock().ok().and_then(|g| g.clone());
        let Some(grant) = grant else {
            return Err(russh::Error::NotAuthenticated);
        };
        let (tx, rx) = watch::channel(Link::Pending);
        self.link = Some(rx.clone());
        if let Ok(mut slot) = self.state.link.lock() {
            *slot = Some(rx);
        }
        let from_vm = self.state.from_vm.clone();
        let forwards = Arc::new(ForwardsToUser {
            user: session.handle(),
            ctx: self.pump_context(session.handle()),
        });
        let shared = self.shared.clone();
        let id = self.id.clone();
        let span = tracing::info_span!("vm_link", session = %id, vm = %grant.vm);
        tokio::spawn(link_to_vm(shared, grant, id, forwards, from_vm, tx).instrument(span));
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        let Some(mut link) = self.link.clone() else {
            return Ok(()); // dropping `reply` refuses the channel
        };
        self.shared.metrics.channel("session");
        let ctx = self.pump_context(session.handle());
        tokio::spawn(async move {
            // Accepted at once: the user's requests queue in order while the VM connects,
            // and a VM that cannot be reached is explained on this channel.
            reply.accept().await;
            let user = UserEnd::open(channel, &ctx.to_vm);
            let vm = match ready(&mut link).await {
                Ok(vm) => vm,
                Err(why) => return bridge::refuse_session(&user.tx, &why).await,
            };
            let vm_channel = match vm.channel_open_session().await {
                Ok(c) => c,
                Err(e) => {
                    return bridge::refuse_session(
                        &user.tx,
                        &format!("vmedge: the VM refused a session channel: {e}"),
                    )
                    .await;
                }
            };
            let vm = VmEnd::open(vm_channel, &ctx.from_vm);
            bridge::bridge(user, vm, ctx).await;
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        let Some(mut link) = self.link.clone() else {
            return Ok(());
        };
        self.shared.metrics.channel("direct-tcpip");
        let ctx = self.pump_context(session.handle());
        let (host, originator) = (host_to_connect.to_string(), originator_address.to_string());
        tokio::spawn(async move {
            let Ok(vm) = ready(&mut link).await else {
                return reply.reject(ChannelOpenFailure::ConnectFailed).await;
            };
            match vm
                .channel_open_direct_tcpip(
                    host.clone(),
                    port_to_connect,
                    originator,
                    originator_port,
                )
                .await
            {
                Ok(vm_channel) => {
                    reply.accept().await;
                    let user = UserEnd::open(channel, &ctx.to_vm);
                    let vm = VmEnd::open(vm_channel, &ctx.from_vm);
                    bridge::bridge(user, vm, ctx).await;
                }
                Err(e) => {
                    tracing::debug!(
                        "direct-tcpip to {host}:{port_to_connect} refused by the VM: {e}"
                    );
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        let Some(mut link) = self.link.clone() else {
            return Ok(false);
        };
        let asked = *port;
        let forward = async {
            let vm = ready(&mut link).await.ok()?;
            vm.tcpip_forward(address, asked).await.ok()
        };
        match tokio::time::timeout(self.shared.upstream.connect_timeout, forward).await {
            Ok(Some(bound)) => {
                if asked == 0 {
                    *port = bound;
                }
                tracing::info!(session = %self.id, address, port = *port, "remote forward open on the VM");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        let Some(Link::Ready(vm)) = self.link.as_ref().map(|l| l.borrow().clone()) else {
            return Ok(false);
        };
        Ok(vm.cancel_tcpip_forward(address, port).await.is_ok())
    }

    // The user's channel requests are answered as they arrive, so no callback waits on the
    // VM; bridge.rs forwards each one in order. A refused shell/exec/subsystem is told on
    // the channel.
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

/// Makes the session's VM connection: waits for the VM to run (or says why it will not),
/// then connects and logs in. The outcome is published on `link`.
async fn link_to_vm(
    shared: Arc<Shared>,
    grant: Grant,
    session_id: String,
    forwards: Arc<ForwardsToUser>,
    from_vm: Arc<Backlogs>,
    link: watch::Sender<Link>,
) {
    let started = Instant::now();
    let vm = match shared.wait_running(&grant.vm).await {
        Ok(vm) => vm,
        Err(line) => {
            shared.metrics.upstream_failure("vm_state");
            tracing::info!("{line}");
            let _ = link.send(Link::Failed(line.into()));
            return;
        }
    };
    let subject = CertSubject {
        user_id: &grant.user_id,
        session_id: &session_id,
        fingerprint: &grant.fingerprint,
    };
    let forwards: Arc<dyn ForwardedChannels> = forwards;
    match upstream::connect(&shared.upstream, &vm, &subject, forwards, from_vm).await {
        Ok(connection) => {
            shared.metrics.upstream_connected(started.elapsed());
            tracing::info!(addr = %vm.public_ipv6, ms = started.elapsed().as_millis() as u64, "logged in to the VM");
            let _ = link.send(Link::Ready(Arc::new(connection)));
        }
        Err(e) => {
            shared.metrics.upstream_failure(e.reason());
            tracing::warn!("cannot reach the VM: {e}");
            let _ = link.send(Link::Failed(e.to_user(&grant.vm).into()));
        }
    }
}

/// Hands `ssh -R` connections from the VM to the user.
struct ForwardsToUser {
    user: server::Handle,
    ctx: PumpContext,
}

impl ForwardedChannels for ForwardsToUser {
    fn forwarded(
        &self,
        vm_channel: Channel<client::Msg>,
        open: ForwardedOpen,
        reply: client::ChannelOpenHandle,
    ) {
        let user = self.user.clone();
        let ctx = self.ctx.clone();
        ctx.metrics.channel("forwarded-tcpip");
        tokio::spawn(async move {
            let opened = user
                .channel_open_forwarded_tcpip(
                    open.connected_address,
                    open.connected_port,
                    open.originator_address,
                    open.originator_port,
                )
                .await;
            match opened {
                Ok(user_channel) => {
                    reply.accept().await;
                    let user = UserEnd::open(user_channel, &ctx.to_vm);
                    let vm = VmEnd::open(vm_channel, &ctx.from_vm);
                    bridge::bridge(user, vm, ctx).await;
                }
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
        });
    }
}

/// The one line a user is told about a VM that is not running (after authentication).
pub fn unavailable_line(vm: &vmedge_model::VmId, status: &VmStatus) -> String {
    match status {
        VmStatus::Stopped => format!("vmedge: VM {vm} is stopped; start it, then connect again"),
        VmStatus::Deleting => format!("vmedge: VM {vm} is being deleted"),
        VmStatus::Error => format!("vmedge: VM {vm} is in an error state"),
        other => format!("vmedge: VM {vm} is {other}"),
    }
}
