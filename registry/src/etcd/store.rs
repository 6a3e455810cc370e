//! The etcd store itself: a client for one member, the whole state read at one revision,
//! and a state written in one transaction (`vmedge state push` / `pull`).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use crate::errors::RegistryError;
use crate::keyed::{PREFIX, USERS, VMS};

/// A member that does not take the connection in this long is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A request that takes longer than this fails (a member without quorum hangs).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings: a member that stops answering is left within about 9 s. etcd closes
/// the connection of a client that pings more often than every 5 s
/// (`--grpc-keepalive-min-time`); a member that dies outright is left at once (the
/// kernel resets its connections).
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(3));
/// Keys per page of a full read: bounds each response whatever the fleet's size.
const PAGE: i64 = 1000;
/// The largest response accepted (a page of large VM objects, a big transaction's events).
pub(super) const MAX_MESSAGE: usize = 256 << 20;

/// Every key under [`PREFIX`] with its value, in key order.
pub type Keys = Vec<(String, Vec<u8>)>;

/// A client for one member. Reads are linearizable and the watch requires a leader: a
/// member cut off from its quorum fails rather than serving old data.
pub async fn connect(endpoint: &str) -> Result<Client, etcd_client::Error> {
    if endpoint.starts_with("https://") {
        // Built without the TLS features: the client would fail later, less clearly.
        return Err(etcd_client::Error::InvalidArgs(
            "TLS to etcd is not supported yet (use http://, or a local etcd grpc-proxy)".into(),
        ));
    }
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    Client::connect([endpoint], Some(options)).await
}

/// Every key under [`PREFIX`] with its value, read at one revision, and that revision.
pub async fn read_all(client: &Client) -> Result<(Keys, i64), etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let end = prefix_end(PREFIX.as_bytes());
    let mut start = PREFIX.as_bytes().to_vec();
    let mut revision = 0;
    let mut all = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision != 0 {
            options = options.with_revision(revision);
        }
        let page = tokio::time::timeout(REQUEST_TIMEOUT, kv.get(start.clone(), Some(options)))
            .await
            .map_err(|_| timeout())??;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        for kv in page.kvs() {
            match kv.key_str() {
                Ok(key) => all.push((key.to_string(), kv.value().to_vec())),
                Err(_) => tracing::warn!(key = ?kv.key(), "etcd key is not UTF-8; ignored"),
            }
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok((all, revision)),
        }
    }
}

fn timeout() -> etcd_client::Error {
    etcd_client::Error::InvalidArgs("no answer in time (is the cluster's quorum lost?)".into())
}

/// The first member of `endpoints` that answers, with everything it holds.
pub(super) async fn first_answer(
    endpoints: &[String],
) -> Result<(Client, Keys, i64), RegistryError> {
    let mut failures = Vec::new();
    for endpoint in endpoints {
        let attempt = async {
            let client = connect(endpoint).await?;
            let (keys, revision) = read_all(&client).await?;
            Ok::<_, etcd_client::Error>((client, keys, revision))
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(e) => failures.push(format!("{endpoint}: {e}")),
        }
    }
    Err(etcd_error(endpoints, failures.join("; ")))
}

pub(super) fn etcd_error(endpoints: &[String], message: String) -> RegistryError {
    RegistryError::Etcd {
        endpoints: endpoints.join(","),
        message,
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Keys written (new or changed).
    pub put: usize,
    /// Keys deleted (objects no longer in the state).
    pub deleted: usize,
    /// Keys already holding the same value, left alone (watchers see no event).
    pub unchanged: usize,
    /// The store revision after the push (the one read, when nothing changed).
    pub revision: i64,
}

/// Makes the VM and user keys in etcd hold exactly `objects` (key -> JSON text), in one
/// transaction: changed keys are written, keys of objects that are gone deleted, equal
/// ones left alone. The transaction only commits if nothing under [`PREFIX`] changed
/// since it was read; otherwise nothing is written and the error says so. The caller
/// validates the state first.
pub async fn push(
    endpoints: &[String],
    objects: &BTreeMap<String, Vec<u8>>,
) -> Result<Pushed, RegistryError> {
    let (client, current, revision) = first_answer(endpoints).await?;
    let current: BTreeMap<String, Vec<u8>> = current.into_iter().collect();
    let mut ops = Vec::new();
    let mut pushed = Pushed {
        put: 0,
        deleted: 0,
        unchanged: 0,
        revision,
    };
    for key in current.keys() {
        let ours = key.starts_with(VMS) || key.starts_with(USERS);
        if ours && !objects.contains_key(key) {
            ops.push(TxnOp::delete(key.as_str(), None));
            pushed.deleted += 1;
        }
    }
    for (key, value) in objects {
        if current.get(key) == Some(value) {
            pushed.unchanged += 1;
        } else {
            ops.push(TxnOp::put(key.as_str(), value.clone(), None));
            pushed.put += 1;
        }
    }
    if ops.is_empty() {
        return Ok(pushed);
    }
    let ops_count = ops.len();
    // Nothing under the prefix written since our read: otherwise we would undo it.
    let unchanged_since_read =
        Compare::mod_revision(PREFIX, CompareOp::Less, revision + 1).with_prefix();
    let txn = Txn::new().when([unchanged_since_read]).and_then(ops);
    let mut kv = client.kv_client();
    let response = tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(txn))
        .await
        .map_err(|_| etcd_error(endpoints, timeout().to_string()))?
        .map_err(|e| {
            let mut message = format!("the transaction was refused: {e}");
            if e.to_string().contains("too many operations") {
                message.push_str(&format!(
                    " (it has {ops_count} operations: start etcd with --max-txn-ops of at least that)"
                ));
            }
            if e.to_string().contains("request is too large") {
                message.push_str(" (start etcd with a larger --max-request-bytes)");
            }
            etcd_error(endpoints, message)
        })?;
    if !response.succeeded() {
        return Err(etcd_error(
            endpoints,
            "the state in etcd changed while pushing; nothing was written (push again)".into(),
        ));
    }
    pushed.revision = response.header().map_or(revision, |h| h.revision());
    Ok(pushed)
}

/// Every VM and user key with its value (`vmedge state pull`), and the revision read.
pub async fn pull(endpoints: &[String]) -> Result<(Keys, i64), RegistryError> {
    let (_, keys, revision) = first_answer(endpoints).await?;
    let ours = keys
        .into_iter()
        .filter(|(k, _)| k.starts_with(VMS) || k.starts_with(USERS))
        .collect();
    Ok((ours, revision))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/vmedge/"), b"/vmedge0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
