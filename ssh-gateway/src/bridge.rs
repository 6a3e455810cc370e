//! One user channel bridged to one VM channel, both ways, each way its own task.
//!
//! Flow control, with russh as patched in `vendor/russh` (vendor/README.md):
//! - Data is read from each side's `Channel` queue only (the gateway implements no
//!   `Handler::data`), so every byte takes one path.
//! - Data is written with `ChannelWriteHalf::data_bytes`, which waits for the receiving
//!   peer's window; `Handle::data` would queue without bound and is never used.
//! - Window credit follows consumption, per channel. Each side's messages are taken off
//!   russh's queue as they arrive (a [`Spool`]), so russh's session loop never waits on a
//!   full queue (two such loops in a bridge would deadlock: each one's window adjusts would
//!   sit behind the other). The bytes spooled and not yet written on are the channel's
//!   [`Backlog`]. The handlers' `adjust_window`, asked by russh for every data packet,
//!   answers from that channel's backlog: the window less the backlog, so what the peer may
//!   still send plus what waits here stays within one window ([`USER_WINDOW`] from users,
//!   [`VM_WINDOW`] from VMs). Under half a window free it gives nothing (no dribbles of
//!   tiny adjusts); when the pump has written the backlog under half a window it grants
//!   the rest (`ChannelWriteHalf::grant_window`).
//!
//! So a slow destination slows its own source channel and nothing else: memory per channel
//! and direction stays within one window, and the other channels of the connection,
//! keepalives and rekeying go on. [`SPOOL_BYTES`] is a hard stop for a peer that ignores
//! its window (only that connection then stalls).
//!
//! Requests keep their order relative to data because russh puts them on the same queue.
//! The user's requests were answered when they arrived (see `session`); the VM is asked for
//! a reply only on the request that starts the channel (shell, exec, subsystem), and a
//! refusal there is told to the user on stderr before the channel closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::{client, server, Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Last channel activity of one connection (for the idle timeout).
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Something moved now.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long nothing has moved.
    pub fn idle(&self) -> std::time::Duration {
        let ms = self.start.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(ms.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// What a pump needs besides its two ends.
#[derive(Clone)]
pub struct PumpContext {
    /// Counts bytes.
    pub metrics: Arc<Metrics>,
    /// Marks activity.
    pub activity: Arc<Activity>,
    /// The user's connection, for messages a write half cannot send (exit-signal).
    pub user: server::Handle,
    /// The backlogs of the user's channels (bytes on their way to the VM).
    pub to_vm: Arc<Backlogs>,
    /// The backlogs of the VM's channels (bytes on their way to the user).
    pub from_vm: Arc<Backlogs>,
}

/// The window granted to users on each channel (russh's default, and OpenSSH's).
pub const USER_WINDOW: u32 = 2 << 20;

/// The window granted to VMs on each channel. The hop is short, so less covers its
/// round trip; and every byte in it queues ahead of the VM's bytes on the connection's
/// other channels (an interactive session beside a bulk one).
pub const VM_WINDOW: u32 = 1 << 20;

/// Hard stop for one channel's spool: a peer that ignored its window. Far above a window,
/// so honest peers never reach it.
pub const SPOOL_BYTES: usize = 16 << 20;

/// Bytes of one channel, in one direction, spooled and not yet written on.
#[derive(Debug)]
pub struct Backlog {
    bytes: AtomicUsize,
    window: u32,
}

impl Backlog {
    fn new(window: u32) -> Self {
        Backlog {
            bytes: AtomicUsize::new(0),
            window,
        }
    }

    /// The channel's window target for a backlog of `bytes`: what the window leaves free,
    /// or 0 (no new credit) while that is under half of it.
    fn target(&self, bytes: usize) -> u32 {
        let free = (self.window as usize).saturating_sub(bytes);
        if free < self.window as usize / 2 {
            0
        } else {
            free as u32
        }
    }

    /// The channel's window target now.
    pub fn window(&self) -> u32 {
        self.target(self.bytes.load(Ordering::Relaxed))
    }
}

/// The backlogs of one connection's channels in one direction, by the number of the
/// channel id russh gives the handler.
#[derive(Debug)]
pub struct Backlogs {
    window: u32,
    channels: Mutex<HashMap<u32, Arc<Backlog>>>,
}

impl Backlogs {
    /// For channels granted `window` bytes.
    pub fn new(window: u32) -> Self {
        Backlogs {
            window,
            channels: Mutex::default(),
        }
    }

    /// The window target for `channel` (see [`Backlog::window`]); a channel not bridged
    /// (yet) holds nothing back.
    pub fn window(&self, channel: ChannelId) -> u32 {
        self.window_of(channel.number())
    }

    fn window_of(&self, channel: u32) -> u32 {
        let map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&channel).map_or(self.window, |b| b.window())
    }

    fn register(self: &Arc<Self>, channel: u32) -> Registration {
        let backlog = Arc::new(Backlog::new(self.window));
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(channel, backlog.clone());
        Registration {
            backlogs: self.clone(),
            channel,
            backlog,
        }
    }
}

/// A channel's entry in its connection's [`Backlogs`], removed when the channel is done.
struct Registration {
    backlogs: Arc<Backlogs>,
    channel: u32,
    backlog: Arc<Backlog>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = (self.backlogs.channels.lock()).unwrap_or_else(|e| e.into_inner());
        map.remove(&self.channel);
    }
}

/// A spooled message's place in its spool and its channel's backlog.
pub struct Held {
    _permit: OwnedSemaphorePermit,
    backlog: Arc<Backlog>,
    cost: usize,
}

impl Held {
    /// Gives the space back once the message is written on. When that ends a stretch in
    /// which the channel got no new credit, the window target to grant the peer now.
    fn release(mut self) -> Option<u32> {
        let cost = std::mem::take(&mut self.cost);
        let before = self.backlog.bytes.fetch_sub(cost, Ordering::Relaxed);
        let after = before.saturating_sub(cost);
        let target = self.backlog.target(after);
        (self.backlog.target(before) == 0 && target > 0).then_some(target)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backlog.bytes.fetch_sub(self.cost, Ordering::Relaxed);
    }
}

/// What a message costs against the spool (control messages too: a flood of them is
/// bounded like data).
fn cost(msg: &ChannelMsg) -> u32 {
    let data = match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len(),
        _ => 0,
    };
    data.clamp(64, SPOOL_BYTES) as u32
}

/// One direction's messages, taken off russh's queue as they arrive and held until the
/// pump has written them, within [`SPOOL_BYTES`].
pub struct Spool {
    rx: mpsc::UnboundedReceiver<(ChannelMsg, Held)>,
}

impl Spool {
    /// Starts draining `from`, counting what it holds in `backlog`.
    fn drain(mut from: ChannelReadHalf, backlog: Arc<Backlog>) -> Spool {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(SPOOL_BYTES));
        tokio::spawn(async move {
            while let Some(msg) = from.wait().await {
                // Waits only for a peer that ignored its window.
                let cost = cost(&msg);
                let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                    return;
                };
                backlog.bytes.fetch_add(cost as usize, Ordering::Relaxed);
                let held = Held {
                    _permit: permit,
                    backlog: backlog.clone(),
                    cost: cost as usize,
                };
                if tx.send((msg, held)).is_err() {
                    return;
                }
            }
        });
        Spool { rx }
    }

    /// The next message; its space is given back through the returned [`Held`].
    async fn next(&mut self) -> Option<(ChannelMsg, Held)> {
        self.rx.recv().await
    }
}

/// One side of a bridged channel: what it sends, already being spooled, and its writer.
pub struct End<S: From<(ChannelId, ChannelMsg)>> {
    spool: Spool,
    /// Writes to this side.
    pub tx: ChannelWriteHalf<S>,
    _registration: Registration,
}

impl<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> End<S> {
    /// Starts spooling what `channel` sends, its backlog counted in `backlogs`. Done as
    /// soon as the channel is open, so what arrives before the other side is ready is
    /// held back by the window too.
    pub fn open(channel: Channel<S>, backlogs: &Arc<Backlogs>) -> Self {
        let (rx, tx) = channel.split();
        let registration = backlogs.register(tx.id().number());
        End {
            spool: Spool::drain(rx, registration.backlog.clone()),
            tx,
            _registration: registration,
        }
    }
}

/// The user's side of a channel.
pub type UserEnd = End<server::Msg>;

/// The VM's side of a channel.
pub type VmEnd = End<client::Msg>;

/// Runs both directions until both sides have closed the channel.
pub async fn bridge(user: UserEnd, vm: VmEnd, ctx: PumpContext) {
    let End {
        spool: user_spool,
        tx: user_tx,
        _registration: _user,
    } = user;
    let End {
        spool: vm_spool,
        tx: vm_tx,
        _registration: _vm,
    } = vm;
    tokio::join!(
        user_to_vm(user_spool, &user_tx, &vm_tx, &ctx),
        vm_to_user(vm_spool, &vm_tx, &user_tx, &ctx),
    );
}

/// Everything the user sends on the channel, in order, to the VM.
/// `credit` is the user's side, granted window again as the spool drains.
async fn user_to_vm(
    mut from: Spool,
    credit: &ChannelWriteHalf<server::Msg>,
    to: &ChannelWriteHalf<client::Msg>,
    ctx: &PumpContext,
) {
    while let Some((msg, held)) = from.next().await {
        ctx.activity.touch();
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.metrics.bytes_to_vm(data.len());
                to.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                ctx.metrics.bytes_to_vm(data.len());
                to.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => {
                let _ = to.close().await;
                return;
            }
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                to.request_pty(
                    false,
                    &term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    &terminal_modes,
                )
                .await
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => to.set_env(false, variable_name, variable_value).await,
            ChannelMsg::RequestShell { .. } => to.request_shell(true).await,
            ChannelMsg::Exec { command, .. } => to.exec(true, command).await,
            ChannelMsg::RequestSubsystem { name, .. } => to.request_subsystem(true, name).await,
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                to.window_change(col_width, row_height, pix_width, pix_height)
                    .await
            }
            ChannelMsg::Signal { signal } => to.signal(signal).await,
            // X11 and agent forwarding are not bridged (refused when asked).
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
        if let Some(target) = held.release() {
            if credit.grant_window(target).await.is_err() {
                break;
            }
        }
    }
    // The user's connection is gone (or the VM's): close the VM's side.
    let _ = to.close().await;
}

/// Everything the VM sends on the channel, in order, to the user.
/// `credit` is the VM's side, granted window again as the spool drains.
async fn vm_to_user(
    mut from: Spool,
    credit: &ChannelWriteHalf<client::Msg>,
    to: &ChannelWriteHalf<server::Msg>,
    ctx: &PumpContext,
) {
    while let Some((msg, held)) = from.next().await {
        ctx.activity.touch();
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.metrics.bytes_from_vm(data.len());
                to.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                ctx.metrics.bytes_from_vm(data.len());
                to.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => {
                let _ = to.close().await;
                return;
            }
            ChannelMsg::ExitStatus { exit_status } => to.exit_status(exit_status).await,
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => ctx
                .user
                .exit_signal_request(to.id(), signal_name, core_dumped, error_message, lang_tag)
                .await
                .map_err(|()| russh::Error::SendError),
            ChannelMsg::Failure => {
                // The VM refused the shell, exec or subsystem that starts this channel.
                let line = "vmedge: the VM refused the request\r\n";
                let _ = to.extended_data_bytes(1, line.as_bytes().to_vec()).await;
                let _ = to.eof().await;
                Err(russh::Error::RequestDenied)
            }
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
        if let Some(target) = held.release() {
            if credit.grant_window(target).await.is_err() {
                break;
            }
        }
    }
    let _ = to.close().await;
}

/// Tells the user why the channel has no VM behind it (stderr), then closes it.
pub async fn refuse_session(user_tx: &ChannelWriteHalf<server::Msg>, line: &str) {
    let _ = user_tx
        .extended_data_bytes(1, format!("{line}\r\n").into_bytes())
        .await;
    let _ = user_tx.exit_status(255).await;
    let _ = user_tx.eof().await;
    let _ = user_tx.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(backlog: &Arc<Backlog>, cost: usize) -> Held {
        let permit = Arc::new(Semaphore::new(cost)).try_acquire_many_owned(cost as u32);
        backlog.bytes.fetch_add(cost, Ordering::Relaxed);
        Held {
            _permit: permit.unwrap(),
            backlog: backlog.clone(),
            cost,
        }
    }

    #[test]
    fn credit_follows_consumption_per_channel() {
        let backlogs = Arc::new(Backlogs::new(1000));
        let (slow, busy) = (1, 2);
        let slow_entry = backlogs.register(slow);
        let _busy_entry = backlogs.register(busy);
        let b = &slow_entry.backlog;

        // Unconsumed bytes come off the window; past half of it, no new credit at all.
        let first = hold(b, 400);
        assert_eq!(backlogs.window_of(slow), 600);
        let second = hold(b, 200);
        assert_eq!(backlogs.window_of(slow), 0);
        assert_eq!(
            backlogs.window_of(busy),
            1000,
            "another channel keeps its window"
        );

        // Written down to half a window or less: the pump grants what is free, once.
        assert_eq!(second.release(), Some(600));
        assert_eq!(first.release(), None, "credit was already flowing");
        assert_eq!(backlogs.window_of(slow), 1000);

        // A dropped message gives its space back too; past the window is no credit.
        let dropped = hold(b, 5000);
        assert_eq!(backlogs.window_of(slow), 0);
        drop(dropped);
        assert_eq!(backlogs.window_of(slow), 1000);
        // A channel that is done holds nothing back.
        drop(slow_entry);
        assert_eq!(backlogs.window_of(slow), 1000);
        assert_eq!(backlogs.channels.lock().unwrap().len(), 1);
    }
}
