//! One user channel bridged to one VM channel, both ways, each way its own task.
//!
//! Flow control, given how russh works:
//! - Data is read from each side's `Channel` queue only (the gateway implements no
//!   `Handler::data`), so every byte takes one path.
//! - Data is written with `ChannelWriteHalf::data_bytes`, which waits for the receiving
//!   peer's window; `Handle::data` would queue without bound and is never used.
//! - russh credits window when data arrives and, when a channel's queue is full, waits for
//!   room inside its session loop: that loop then reads nothing, window adjusts included.
//!   A bridge that let both loops block at once would deadlock: the user->VM queue full
//!   because the VM's window ran out, whose adjust waits behind the upstream loop, blocked
//!   on a full VM->user queue because the user's window ran out, whose adjust waits behind
//!   the first loop (seen with `ssh vm cat < 100MB` under load). So each direction drains
//!   russh's queue at once into a [`Spool`], and the bytes spooled per connection and
//!   direction are its [`Backlog`]. Over [`BACKLOG_LIMIT`], the connection's handler
//!   (`Handler::adjust_window`, the one lever russh gives) drops russh's window target to
//!   a trickle, so the peer soon stops sending while the loop keeps reading its window
//!   adjusts; below it, the full window is granted again at the next adjust. The spools
//!   never fill ([`SPOOL_BYTES`] is a hard stop far above), the loops never block, memory
//!   per connection is bounded, and a slow user slows the VM. The price: while one
//!   channel's destination is slow, the other channels of that connection trickle too.
//!
//! Requests keep their order relative to data because russh puts them on the same queue.
//! The user's requests were answered when they arrived (see `session`); the VM is asked for
//! a reply only on the request that starts the channel (shell, exec, subsystem), and a
//! refusal there is told to the user on stderr before the channel closes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use russh::{client, server, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
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
    /// Bytes spooled from the user towards the VM, on this connection.
    pub to_vm: Arc<Backlog>,
    /// Bytes spooled from the VM towards the user, on this connection.
    pub from_vm: Arc<Backlog>,
}

/// The user's half and the VM's half of one bridged channel.
pub struct Ends {
    /// Reading from the user.
    pub user_rx: ChannelReadHalf,
    /// Writing to the user.
    pub user_tx: ChannelWriteHalf<server::Msg>,
    /// Reading from the VM.
    pub vm_rx: ChannelReadHalf,
    /// Writing to the VM.
    pub vm_tx: ChannelWriteHalf<client::Msg>,
}

/// The window russh grants peers on both sides (its default, and OpenSSH's).
pub const WINDOW: u32 = 2 << 20;

/// Spooled bytes (one connection, one direction) over which new window is withheld.
pub const BACKLOG_LIMIT: usize = 1 << 20;

/// Hard stop for one channel's spool: a peer that ignored its window. Far above
/// [`BACKLOG_LIMIT`] plus the window already granted, so honest peers never reach it.
pub const SPOOL_BYTES: usize = 16 << 20;

/// Bytes spooled by one connection in one direction, not yet written on.
#[derive(Debug, Default)]
pub struct Backlog(AtomicUsize);

impl Backlog {
    /// The window target russh should use from its next adjust on: the full window, or a
    /// trickle (2 bytes: russh then adjusts again, and asks again, as soon as the peer has
    /// used it) while the backlog is over its limit.
    pub fn next_window(&self) -> u32 {
        if self.0.load(Ordering::Relaxed) > BACKLOG_LIMIT {
            2
        } else {
            WINDOW
        }
    }
}

/// A spooled message's place in its spool and its connection's backlog, given back when
/// the pump has written the message.
pub struct Held {
    _permit: OwnedSemaphorePermit,
    backlog: Arc<Backlog>,
    cost: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backlog.0.fetch_sub(self.cost, Ordering::Relaxed);
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
    pub fn drain(mut from: ChannelReadHalf, backlog: Arc<Backlog>) -> Spool {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(SPOOL_BYTES));
        tokio::spawn(async move {
            while let Some(msg) = from.wait().await {
                // Waits only for a peer that ignored its window.
                let cost = cost(&msg);
                let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                    return;
                };
                backlog.0.fetch_add(cost as usize, Ordering::Relaxed);
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

    /// The next message; its space is given back when the returned [`Held`] drops.
    async fn next(&mut self) -> Option<(ChannelMsg, Held)> {
        self.rx.recv().await
    }
}

/// Runs both directions until both sides have closed the channel.
pub async fn bridge(ends: Ends, ctx: PumpContext) {
    let Ends {
        user_rx,
        user_tx,
        vm_rx,
        vm_tx,
    } = ends;
    tokio::join!(
        user_to_vm(Spool::drain(user_rx, ctx.to_vm.clone()), &vm_tx, &ctx),
        vm_to_user(Spool::drain(vm_rx, ctx.from_vm.clone()), &user_tx, &ctx),
    );
}

/// Everything the user sends on the channel, in order, to the VM.
async fn user_to_vm(mut from: Spool, to: &ChannelWriteHalf<client::Msg>, ctx: &PumpContext) {
    while let Some((msg, _held)) = from.next().await {
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
    }
    // The user's connection is gone (or the VM's): close the VM's side.
    let _ = to.close().await;
}

/// Everything the VM sends on the channel, in order, to the user.
async fn vm_to_user(mut from: Spool, to: &ChannelWriteHalf<server::Msg>, ctx: &PumpContext) {
    while let Some((msg, _held)) = from.next().await {
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
