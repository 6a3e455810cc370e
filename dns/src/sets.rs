//! Filling fqdn sets: the addresses of an answer go into the asking VM's sets before the
//! answer leaves the gate.
//!
//! [`NetlinkSets`] owns one nf_tables netlink socket on a thread of its own, so a commit
//! (tens of microseconds) never blocks the runtime. Inserts queued while a commit runs go
//! out together in the next batch; if that batch is refused, each insert is retried alone
//! so one VM's missing set never fails another VM's answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
pub use vmedge_firewall::netlink::FqdnElement;
use vmedge_firewall::netlink::{encode_fqdn_elements, Batch, NetlinkSocket};

/// Why an insert did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SetError {
    /// The kernel refused the batch (a set that does not exist yet, most often).
    #[error("{0}")]
    Refused(String),
    /// The writer is gone or its queue is full.
    #[error("the set writer is not accepting inserts ({0})")]
    Unavailable(&'static str),
}

/// A boxed insert, so the gate can hold any writer behind one pointer.
pub type Insert<'a> = Pin<Box<dyn Future<Output = Result<(), SetError>> + Send + 'a>>;

/// Where fqdn addresses go.
pub trait SetWriter: Send + Sync {
    /// Adds (or refreshes) the elements, all or nothing.
    fn insert(&self, elements: Vec<FqdnElement>) -> Insert<'_>;
}

struct Job {
    elements: Vec<FqdnElement>,
    done: oneshot::Sender<Result<(), SetError>>,
}

/// Inserts over netlink, from a dedicated thread.
#[derive(Debug, Clone)]
pub struct NetlinkSets {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("elements", &self.elements.len())
            .finish()
    }
}

/// Inserts waiting for the writer thread at most; beyond that an answer gets SERVFAIL.
const QUEUE: usize = 4096;
/// Inserts merged into one batch at most.
const MERGE: usize = 64;

impl NetlinkSets {
    /// Opens the socket (in the named network namespace, or this process's) and starts
    /// the writer thread.
    pub fn start(netns: Option<&str>) -> Result<NetlinkSets, vmedge_firewall::FirewallError> {
        let socket = match netns {
            Some(ns) => NetlinkSocket::open_in_netns(ns)?,
            None => NetlinkSocket::open()?,
        };
        let (jobs, queue) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("vmedge-dns-sets".into())
            .spawn(move || write_loop(socket, queue))
            .map_err(vmedge_firewall::FirewallError::Io)?;
        Ok(NetlinkSets { jobs })
    }
}

impl SetWriter for NetlinkSets {
    fn insert(&self, elements: Vec<FqdnElement>) -> Insert<'_> {
        Box::pin(async move {
            let (done, result) = oneshot::channel();
            self.jobs
                .try_send(Job { elements, done })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SetError::Unavailable("queue full"),
                    mpsc::error::TrySendError::Closed(_) => SetError::Unavailable("stopped"),
                })?;
            result
                .await
                .unwrap_or(Err(SetError::Unavailable("stopped")))
        })
    }
}

fn commit(socket: &mut NetlinkSocket, jobs: &[&Job]) -> Result<(), SetError> {
    let mut batch = Batch::new(socket.next_seq());
    for job in jobs {
        encode_fqdn_elements(&mut batch, &job.elements);
    }
    socket
        .commit(batch)
        .map_err(|e| SetError::Refused(e.to_string()))
}

fn write_loop(mut socket: NetlinkSocket, mut queue: mpsc::Receiver<Job>) {
    while let Some(first) = queue.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MERGE {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let all: Vec<&Job> = jobs.iter().collect();
        if commit(&mut socket, &all).is_ok() {
            for job in jobs {
                let _ = job.done.send(Ok(()));
            }
            continue;
        }
        // Someone's set is missing: find out whose, one insert at a time.
        for job in jobs {
            let result = commit(&mut socket, &[&job]);
            let _ = job.done.send(result);
        }
    }
}

/// A writer that only records, for `vmedge up` (no firewall) and for tests.
#[derive(Debug, Default, Clone)]
pub struct RecordingSets {
    /// Every element inserted, in order.
    pub inserted: Arc<Mutex<Vec<FqdnElement>>>,
    /// When set, every insert fails with this message.
    pub refuse: Option<String>,
}

impl SetWriter for RecordingSets {
    fn insert(&self, elements: Vec<FqdnElement>) -> Insert<'_> {
        Box::pin(async move {
            if let Some(why) = &self.refuse {
                return Err(SetError::Refused(why.clone()));
            }
            if let Ok(mut inserted) = self.inserted.lock() {
                inserted.extend(elements);
            }
            Ok(())
        })
    }
}

/// For a host without the vmedge table (`vmedge up` on a laptop): inserts succeed and go
/// nowhere, so fqdn names resolve; nothing is enforced there anyway.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFirewall;

impl SetWriter for NoFirewall {
    fn insert(&self, _elements: Vec<FqdnElement>) -> Insert<'_> {
        Box::pin(async { Ok(()) })
    }
}
