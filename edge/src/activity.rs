//! Last network activity per VM, for an idle-suspend controller, and each VM's request
//! rate bucket.
//!
//! A request takes its VM's [`VmActivity`] once (one map lookup) and then touches plain
//! atomics for every body chunk or WebSocket frame that crosses, both ways.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use vmedge_model::{RateLimit, TokenBucket, VmId};

/// The activity of every VM that has had traffic through this edge.
#[derive(Debug, Default)]
pub struct Activity {
    vms: DashMap<VmId, Arc<VmActivity>>,
}

/// One VM's counters.
#[derive(Debug)]
pub struct VmActivity {
    last_ms: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    budget: Option<TokenBucket>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl VmActivity {
    fn new(limit: Option<RateLimit>) -> VmActivity {
        VmActivity {
            last_ms: AtomicU64::new(now_ms()),
            requests: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            budget: limit.map(TokenBucket::new),
        }
    }

    /// A request arrived.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Bytes went to the VM (request bodies, WebSocket frames from the client).
    pub fn inbound(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Bytes came from the VM (response bodies, WebSocket frames to the client).
    pub fn outbound(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Takes one request from the VM's budget; false when it is spent.
    pub fn admit(&self) -> bool {
        self.budget.as_ref().is_none_or(TokenBucket::take)
    }
}

impl Activity {
    /// The counters of `vm`, made on its first request.
    pub fn vm(&self, vm: VmId, limit: Option<RateLimit>) -> Arc<VmActivity> {
        if let Some(a) = self.vms.get(&vm) {
            return a.clone();
        }
        self.vms
            .entry(vm)
            .or_insert_with(|| Arc::new(VmActivity::new(limit)))
            .clone()
    }

    /// Forgets VMs the state no longer has.
    pub fn retain(&self, keep: impl Fn(&VmId) -> bool) {
        self.vms.retain(|id, _| keep(id));
    }

    /// The JSON served at `/activity`: every VM with traffic, most recent first.
    /// `idle_seconds` is what an idle-suspend controller compares with its timeout.
    pub fn to_json(&self) -> String {
        let now = now_ms();
        let mut rows: Vec<(VmId, u64, u64, u64, u64)> = self
            .vms
            .iter()
            .map(|e| {
                let a = e.value();
                (
                    *e.key(),
                    a.last_ms.load(Ordering::Relaxed),
                    a.requests.load(Ordering::Relaxed),
                    a.bytes_in.load(Ordering::Relaxed),
                    a.bytes_out.load(Ordering::Relaxed),
                )
            })
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = String::from("{\"vms\":[");
        for (i, (id, last, requests, bytes_in, bytes_out)) in rows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(*last));
            out.push_str(&format!(
                "{{\"vm_id\":\"{id}\",\"last_network_activity\":\"{at}\",\"idle_seconds\":{},\"requests\":{requests},\"bytes_in\":{bytes_in},\"bytes_out\":{bytes_out}}}",
                now.saturating_sub(*last) / 1000
            ));
        }
        out.push_str("]}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> VmId {
        VmId::parse(&format!("6f1c2d3e-0000-4000-8000-0000000000{n:02x}")).unwrap()
    }

    #[test]
    fn counts_and_reports_json() {
        let activity = Activity::default();
        let a = activity.vm(id(1), None);
        a.request();
        a.inbound(10);
        a.outbound(32);
        assert!(Arc::ptr_eq(&a, &activity.vm(id(1), None)));
        let json: serde_json::Value = serde_json::from_str(&activity.to_json()).unwrap();
        let row = &json["vms"][0];
        assert_eq!(row["vm_id"], "6f1c2d3e-0000-4000-8000-000000000001");
        assert_eq!(row["requests"], 1);
        assert_eq!(row["bytes_in"], 10);
        assert_eq!(row["bytes_out"], 32);
        assert_eq!(row["idle_seconds"], 0);
        activity.retain(|v| *v != id(1));
        assert_eq!(activity.to_json(), "{\"vms\":[]}\n");
    }
}
