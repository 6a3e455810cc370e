//! Idle keep-alive connections parked off the runtime, as nginx holds them.
//!
//! A plain connection waiting for its next request on a task of its own holds the task
//! (~640 bytes), tokio's registration of its socket (128-aligned) and its [`PlainConn`]:
//! ~1.6 kB each with 10,000 idle, twice what nginx needs. One still silent after
//! [`PARK_AFTER`] is parked: its socket leaves tokio for an epoll set of the edge's own,
//! its task ends, and what is left is a slab entry and a deadline (80 bytes). One task
//! waits on the set for all of them. A parked connection whose client sends (or closes)
//! goes back to tokio on a new task; one still silent at its idle deadline is closed; all
//! are closed when the server stops. A connection busy with requests is never parked, so
//! the keep-alive path pays nothing for it.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::{AsyncFd, AsyncFdReadyMutGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::conn::{ParkedConn, PlainConn};
use crate::metrics::Metrics;

/// How long a connection waits for its next request on its own task before it is parked.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Readiness events taken from the set at once.
const EVENTS: usize = 256;

/// Parked connections, each with the `T` its task needs to go on.
pub struct Parking<T> {
    /// The set's registry, to add a connection from any task.
    registry: mio::Registry,
    parked: Mutex<Parked<T>>,
    /// Wakes the waiting task: a first deadline to wait for, or the end.
    changed: Notify,
    metrics: Arc<Metrics>,
}

struct Parked<T> {
    conns: Slab<Entry<T>>,
    /// Idle deadlines in the order connections were parked, which is their order too (each
    /// is "now" plus the same wait). An entry whose connection left keeps its place here
    /// until its deadline; `seq` tells it from the connection now in the same slot (a
    /// `u32` that wraps: two alike would need 4 billion parked within one idle wait).
    deadlines: VecDeque<Deadline>,
    next_seq: u32,
    closed: bool,
}

struct Entry<T> {
    conn: ParkedConn,
    with: T,
    seq: u32,
}

/// When the connection parked in slot `key` (if still `seq`) is closed.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    key: u32,
    seq: u32,
}

impl<T: Send + 'static> Parking<T> {
    /// An empty set, and the task that waits on it (spawned on the current runtime):
    /// `resume` gets each connection whose client sent or closed, back on tokio.
    pub fn start(
        metrics: Arc<Metrics>,
        resume: impl Fn(PlainConn, T) + Send + 'static,
    ) -> io::Result<Arc<Parking<T>>> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the epoll descriptor belongs to `poll`, which moves into the `AsyncFd`,
        // gives the same descriptor from every `as_raw_fd`, and closes it only when dropped
        // with the `AsyncFd`.
        #[allow(unsafe_code)]
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        let parking = Arc::new(Parking {
            registry,
            parked: Mutex::new(Parked {
                conns: Slab::new(),
                deadlines: VecDeque::new(),
                next_seq: 0,
                closed: false,
            }),
            changed: Notify::new(),
            metrics,
        });
        tokio::spawn(parking.clone().wait(poll, resume));
        Ok(parking)
    }

    /// Parks a [quiet](PlainConn::is_quiet) connection until its client sends, or for
    /// `idle` at most. `Ok`: the set took it (parked, or closed when its socket could not
    /// be moved); `Err` gives it back when the set is closed.
    pub fn park(
        &self,
        conn: Box<PlainConn>,
        with: T,
        idle: Duration,
    ) -> Result<(), Box<PlainConn>> {
        let mut parked = self.lock();
        if parked.closed {
            return Err(conn);
        }
        let Ok(conn) = (*conn).park() else {
            return Ok(());
        };
        let key = parked.conns.vacant_key();
        // Slots are as many as parked sockets, fewer than the descriptors a process has.
        let Ok(slot) = u32::try_from(key) else {
            return Ok(());
        };
        let fd = conn.fd();
        if let Err(e) = self
            .registry
            .register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
        {
            tracing::debug!(error = %e, "an idle connection could not be parked: closed");
            return Ok(());
        }
        let seq = parked.next_seq;
        parked.next_seq = seq.wrapping_add(1);
        parked.conns.insert(Entry { conn, with, seq });
        let first = parked.deadlines.is_empty();
        parked.deadlines.push_back(Deadline {
            at: Instant::now() + idle,
            key: slot,
            seq,
        });
        drop(parked);
        self.metrics.connection_parked();
        if first {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Closes every parked connection and ends the waiting task; later connections are
    /// not parked.
    pub fn close(&self) {
        let mut parked = self.lock();
        parked.closed = true;
        let conns = std::mem::take(&mut parked.conns);
        parked.deadlines = VecDeque::new();
        drop(parked);
        self.metrics.connections_unparked(conns.len());
        drop(conns);
        self.changed.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, Parked<T>> {
        // Nothing panics while holding it; the set is consistent even if something did.
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the set until it is closed: resumes connections with something to read,
    /// closes those whose deadline passed.
    async fn wait(self: Arc<Self>, mut poll: AsyncFd<mio::Poll>, resume: impl Fn(PlainConn, T)) {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let next = {
                let parked = self.lock();
                if parked.closed {
                    return;
                }
                parked.deadlines.front().map(|d| d.at)
            };
            let expired = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = poll.readable_mut() => {
                    let drained = match ready {
                        Ok(mut ready) => self.drain(&mut ready, &mut events, &resume),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = drained {
                        // The set itself failed: no connection can be woken any more.
                        tracing::error!(error = %e, "the parked connections' epoll set failed: all closed");
                        self.close();
                        return;
                    }
                }
                () = expired => self.expire(Instant::now()),
                () = self.changed.notified() => {}
            }
        }
    }

    /// Resumes every connection the set has ready, until it has none: tokio's
    /// edge-triggered readiness of the set is cleared only then.
    fn drain(
        &self,
        ready: &mut AsyncFdReadyMutGuard<'_, mio::Poll>,
        events: &mut Events,
        resume: &impl Fn(PlainConn, T),
    ) -> io::Result<()> {
        loop {
            match ready.get_inner_mut().poll(events, Some(Duration::ZERO)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            if events.is_empty() {
                ready.clear_ready();
                return Ok(());
            }
            for event in events.iter() {
                if let Some((conn, with)) = self.unpark(event.token().0) {
                    resume(conn, with);
                }
            }
        }
    }

    /// The connection in slot `key`, out of the set and back on tokio.
    fn unpark(&self, key: usize) -> Option<(PlainConn, T)> {
        let entry = self.lock().conns.try_remove(key)?;
        self.metrics.connections_unparked(1);
        let fd = entry.conn.fd();
        // Out of the set before tokio takes it: one socket in one set at a time.
        let _ = self.registry.deregister(&mut SourceFd(&fd));
        match entry.conn.resume() {
            Ok(conn) => Some((conn, entry.with)),
            Err(e) => {
                tracing::debug!(error = %e, "a parked connection could not go back on the runtime: closed");
                None
            }
        }
    }

    /// Closes the connections whose deadline is `now` or before.
    fn expire(&self, now: Instant) {
        let mut expired = Vec::new();
        let mut parked = self.lock();
        while let Some(&Deadline { at, key, seq }) = parked.deadlines.front() {
            if at > now {
                break;
            }
            parked.deadlines.pop_front();
            let key = key as usize;
            if parked.conns.get(key).is_some_and(|e| e.seq == seq) {
                expired.push(parked.conns.remove(key));
            }
        }
        if parked.conns.is_empty() {
            // All that is left are places of connections gone: the peak's memory goes too.
            parked.conns = Slab::new();
            parked.deadlines = VecDeque::new();
        }
        drop(parked);
        self.metrics.connections_unparked(expired.len());
        // Closed outside the lock (a closed socket leaves the set by itself).
        drop(expired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_connection_is_small() {
        // Against ~1.6 kB on a task of its own (bench/RESULTS.md), and nginx's ~0.8 kB.
        // The slab's slot adds a tag, 8 bytes: 80 bytes in all.
        let entry = std::mem::size_of::<Entry<Option<u32>>>();
        assert!(entry <= 48, "{entry} bytes");
        let deadline = std::mem::size_of::<Deadline>();
        assert!(deadline <= 24, "{deadline} bytes");
    }
}
