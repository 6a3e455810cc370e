//! One user channel bridged to one VM channel, both ways, each way its own task.
//!
//! Flow control, given how russh works:
//! - Data is read from each side's `Channel` queue only (the gateway implements no
//!   `Handler::data`), so every byte takes one path.
//! - Data is written with `ChannelWriteHalf::data_bytes`, which waits for the receiving
//!   peer's window; `Handle::data` would queue without bound and is never used.
//! - What one direction holds is bounded by russh's per-channel queue
//!   (`channel_buffer_size` packets); when a destination stops granting window, its pump
//!   stops reading, that queue fills and russh stops reading the source connection. So a
//!   slow user slows the VM and memory stays flat. The price is russh's: it credits window
//!   on receipt, so a stalled queue holds up the other channels of that one connection
//!   until the destination drains (see the crate docs).
//!
//! Requests keep their order relative to data because russh puts them on the same queue.
//! The user's requests were answered when they arrived (see `session`); the VM is asked for
//! a reply only on the request that starts the channel (shell, exec, subsystem), and a
//! refusal there is told to the user on stderr before the channel closes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use russh::{client, server, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

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

/// Runs both directions until both sides have closed the channel.
pub async fn bridge(ends: Ends, ctx: PumpContext) {
    let Ends {
        user_rx,
        user_tx,
        vm_rx,
        vm_tx,
    } = ends;
    tokio::join!(
        user_to_vm(user_rx, &vm_tx, &ctx),
        vm_to_user(vm_rx, &user_tx, &ctx),
    );
}

/// Everything the user sends on the channel, in order, to the VM.
async fn user_to_vm(
    mut from: ChannelReadHalf,
    to: &ChannelWriteHalf<client::Msg>,
    ctx: &PumpContext,
) {
    while let Some(msg) = from.wait().await {
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
async fn vm_to_user(
    mut from: ChannelReadHalf,
    to: &ChannelWriteHalf<server::Msg>,
    ctx: &PumpContext,
) {
    while let Some(msg) = from.wait().await {
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
