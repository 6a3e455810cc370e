//! Netlink framing for nf_tables batches: message headers, attributes, nesting.
//!
//! Layouts are the kernel's (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`): a 16-byte
//! `nlmsghdr` in host order, a 4-byte `nfgenmsg`, then attributes (`nlattr`, 4-byte
//! aligned). nf_tables values inside attributes are big-endian.

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;

/// The message type of nf_tables message `kind` (`NFT_MSG_*`).
pub fn nft_type(kind: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | kind
}

/// Each whole message in `buf` (what one `recv` read): its type, its sequence number and
/// its bytes, header included.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + 16)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let seq = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        let message = buf.get(at..at + len).filter(|_| len >= 16)?;
        at += (len + 3) & !3;
        Some((kind, seq, message))
    })
}

/// `nlmsghdr` + `nfgenmsg`.
const HEADER: usize = 16 + 4;

/// One nf_tables transaction being written: BATCH_BEGIN, messages, BATCH_END.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    first_seq: u32,
    /// What each message does, by sequence number, for error messages.
    described: Vec<String>,
}

impl Batch {
    /// A batch whose messages are numbered from `first_seq`.
    pub fn new(first_seq: u32) -> Batch {
        let mut batch = Batch {
            buf: Vec::with_capacity(16 * 1024),
            seq: first_seq,
            first_seq,
            described: Vec::new(),
        };
        let at = batch.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, NFPROTO_UNSPEC);
        batch.finish(at);
        batch
    }

    /// A lone dump request (`NFT_MSG_GET*`), not a transaction: add its attributes,
    /// then [`Batch::finish`] it at 0 and send [`Batch::request_bytes`].
    pub fn dump_request(kind: u16, seq: u32) -> Batch {
        let mut batch = Batch {
            buf: Vec::with_capacity(256),
            seq,
            first_seq: seq,
            described: Vec::new(),
        };
        batch.header(nft_type(kind), NLM_F_REQUEST | NLM_F_DUMP, NFPROTO_INET);
        batch
    }

    /// The bytes of a [`Batch::dump_request`].
    pub fn request_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Starts an nf_tables message (`NFT_MSG_*`) with ack requested; returns its start.
    pub fn message(&mut self, kind: u16, flags: u16, describe: String) -> usize {
        self.described.push(describe);
        self.header(
            nft_type(kind),
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_INET,
        )
    }

    fn header(&mut self, kind: u16, flags: u16, family: u8) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        self.seq = self.seq.wrapping_add(1);
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
            NFNL_SUBSYS_NFTABLES
        } else {
            0
        };
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        debug_assert_eq!(self.buf.len() - at, HEADER);
        at
    }

    /// Sets the length of the message started at `at`.
    pub fn finish(&mut self, at: usize) {
        let len = u32::try_from(self.buf.len() - at).unwrap_or(u32::MAX);
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// An attribute with raw bytes.
    pub fn bytes(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, kind: u16, value: &str) {
        let len = u16::try_from(4 + value.len() + 1).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// A big-endian u32 attribute (nf_tables' convention).
    pub fn u32(&mut self, kind: u16, value: u32) {
        self.bytes(kind, &value.to_be_bytes());
    }

    /// A big-endian u64 attribute.
    pub fn u64(&mut self, kind: u16, value: u64) {
        self.bytes(kind, &value.to_be_bytes());
    }

    /// Starts a nested attribute; close it with [`Batch::end_nest`].
    pub fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    /// Closes the nested attribute started at `at`.
    pub fn end_nest(&mut self, at: usize) {
        let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Bytes written so far.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Messages that expect a reply (all but BATCH_BEGIN and BATCH_END).
    pub fn messages(&self) -> usize {
        self.described.len()
    }

    /// What the message of sequence number `seq` did.
    pub fn describe(&self, seq: u32) -> Option<&str> {
        let i = seq.checked_sub(self.first_seq + 1)?;
        self.described.get(i as usize).map(String::as_str)
    }

    /// The bytes to send: the batch closed with BATCH_END.
    pub fn seal(mut self) -> SealedBatch {
        let at = self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, NFPROTO_UNSPEC);
        self.finish(at);
        SealedBatch { batch: self }
    }
}

/// A batch ready to send.
pub struct SealedBatch {
    batch: Batch,
}

impl SealedBatch {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.batch.buf
    }

    /// The batch's bookkeeping (descriptions, message count).
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    /// Sequence number after this batch.
    pub fn next_seq(&self) -> u32 {
        self.batch.seq
    }
}
