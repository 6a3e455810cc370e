//! Incremental changes straight to the kernel over netlink, as one nf_tables batch.
//!
//! `nft -f` reads the whole table into its cache before it changes anything, and
//! fetches every element of an interval set it adds to: a one-VM change cost 40 ms of
//! cache at 1k VMs and grew from there. A batch built here touches only what changed,
//! so its cost does not grow with the table. Full syncs still go through `nft -f`
//! (one parse of a large file is what nft is good at, and its errors point at lines).
//!
//! - `wire`: netlink framing (headers, attributes, nesting).
//! - `encode`: an [`Update`](crate::Update) as messages, in the expressions nft itself
//!   generates for the same text.

mod encode;
mod wire;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
    SockType,
};
use nix::sys::time::TimeVal;

pub use encode::{encode_fqdn_elements, encode_update, FqdnElement};
pub use wire::{Batch, SealedBatch};

use crate::errors::FirewallError;

/// Batches larger than this go through `nft -f` (a change to many VMs at once).
pub const MAX_BATCH: usize = 4 << 20;

/// A netlink socket to nf_tables, in the network namespace it was opened in.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NetlinkSocket {
    /// A socket in this process's network namespace.
    pub fn open() -> Result<NetlinkSocket, FirewallError> {
        let io = |e: nix::Error| FirewallError::Io(std::io::Error::from(e));
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(io)?;
        // Room for a large batch, and its acks; never wait forever on the kernel.
        let _ = setsockopt(&fd, sockopt::SndBufForce, &(MAX_BATCH * 2));
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(10, 0)).map_err(io)?;
        Ok(NetlinkSocket { fd, seq: 1 })
    }

    /// A socket in the named network namespace (`/run/netns/NAME`): opened on a thread
    /// that enters the namespace, so this process's own namespace is never changed.
    pub fn open_in_netns(name: &str) -> Result<NetlinkSocket, FirewallError> {
        let path = format!("/run/netns/{name}");
        let ns = File::open(&path).map_err(FirewallError::Io)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| FirewallError::Io(std::io::Error::from(e)))?;
                NetlinkSocket::open()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(FirewallError::Io(std::io::Error::other(
                    "the thread entering the namespace panicked",
                )))
            })
        })
    }

    /// The next batch's first sequence number.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// Sends the batch and waits for the kernel's answer to every message. The batch is
    /// one transaction: on any error nothing of it is in force.
    pub fn commit(&mut self, batch: Batch) -> Result<(), FirewallError> {
        let sealed = batch.seal();
        self.seq = sealed.next_seq();
        let fd = self.fd.as_raw_fd();
        let io = |e: nix::Error| FirewallError::Io(std::io::Error::from(e));
        send(fd, sealed.bytes(), MsgFlags::empty()).map_err(io)?;
        let mut pending = sealed.batch().messages();
        let mut buf = vec![0u8; 64 * 1024];
        while pending > 0 {
            let n = recv(fd, &mut buf, MsgFlags::empty()).map_err(io)?;
            for (kind, _, message) in wire::messages(&buf[..n]) {
                if kind != wire::NLMSG_ERROR || message.len() < 16 + 4 + 16 {
                    continue;
                }
                pending = pending.saturating_sub(1);
                let errno = i32::from_ne_bytes(word(message, 16));
                if errno != 0 {
                    // The batch was rolled back as a whole; report its first failure
                    // and drop the answers still queued, so the next batch starts clean.
                    let seq = u32::from_ne_bytes(word(message, 16 + 4 + 8));
                    let what = sealed.batch().describe(seq).unwrap_or("the batch");
                    self.drain();
                    return Err(FirewallError::Refused {
                        message: format!(
                            "the kernel refused {what}: {}",
                            std::io::Error::from_raw_os_error(-errno)
                        ),
                        line: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// The handles of `chain`'s rules, in order (one dump; the chain's rules only).
    pub fn rule_handles(&mut self, chain: &str) -> Result<Vec<u64>, FirewallError> {
        use encode::{NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_TABLE, NFT_MSG_GETRULE};
        let io = |e: nix::Error| FirewallError::Io(std::io::Error::from(e));
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut request = Batch::dump_request(NFT_MSG_GETRULE, seq);
        request.str(NFTA_RULE_TABLE, crate::names::TABLE);
        request.str(NFTA_RULE_CHAIN, chain);
        request.finish(0);
        let fd = self.fd.as_raw_fd();
        send(fd, request.request_bytes(), MsgFlags::empty()).map_err(io)?;
        let mut handles = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(fd, &mut buf, MsgFlags::empty()).map_err(io)?;
            // Answers to something earlier (another sequence number) are skipped.
            for (kind, _, message) in wire::messages(&buf[..n]).filter(|m| m.1 == seq) {
                match kind {
                    wire::NLMSG_DONE => return Ok(handles),
                    wire::NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(word(message, 16));
                        return Err(FirewallError::Io(std::io::Error::from_raw_os_error(-errno)));
                    }
                    k if k == wire::nft_type(encode::NFT_MSG_NEWRULE) => {
                        // nlmsghdr (16) + nfgenmsg (4), then attributes.
                        let handle = attributes(message.get(20..).unwrap_or_default())
                            .find(|(t, _)| *t == NFTA_RULE_HANDLE)
                            .and_then(|(_, v)| <[u8; 8]>::try_from(v).ok())
                            .map(u64::from_be_bytes);
                        handles.extend(handle);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads whatever answers are still queued, so the next batch starts clean.
    fn drain(&self) {
        let mut buf = vec![0u8; 64 * 1024];
        while recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
    }
}

/// The (type, value) of each attribute in `buf`.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, value))
    })
}

fn word(buf: &[u8], at: usize) -> [u8; 4] {
    [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
}
