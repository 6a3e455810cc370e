//! [`Snapshot`]: one immutable state with its indexes, built once, read by every request.
//!
//! Every lookup here takes borrowed or `Copy` keys and returns references into the
//! snapshot: nothing on the request path allocates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::SystemTime;

// Keys come from the state, never from clients (a lookup cannot lengthen a probe
// chain), so a fast hasher is safe here.
use foldhash::{HashMap, HashMapExt};
use vmedge_model::{
    parse_public_host, Fingerprint, HostError, PublicHost, Service, ServiceName, SshKey, State,
    User, Vm, VmId,
};

/// What a hit needs, kept in the map entry itself: no pointer to chase to proxy.
#[derive(Debug, Clone, Copy)]
struct RouteEntry {
    target: SocketAddrV6,
    h2c: bool,
    service: u16,
    vm: u32,
}

/// A service found for a public host: where to send the request, and what it is.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    entry: &'a RouteEntry,
    vms: &'a [Arc<Vm>],
}

impl<'a> Route<'a> {
    /// `[public_ipv6]:port`.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::V6(self.entry.target)
    }

    /// Speak h2c (HTTP/2 prior knowledge) to the VM rather than HTTP/1.1.
    pub fn h2c(&self) -> bool {
        self.entry.h2c
    }

    /// The VM (its status decides between proxying, waking and refusing).
    pub fn vm(&self) -> &'a Vm {
        &self.vms[self.entry.vm as usize]
    }

    /// The service.
    pub fn service(&self) -> &'a Service {
        &self.vm().services[self.entry.service as usize]
    }
}

/// Why a host has no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// Not under `proxy.<domain>` (HTTP 421).
    NotOurs,
    /// Malformed, unknown VM or unknown service: deliberately one answer (HTTP 404).
    Unknown,
}

#[derive(Default)]
struct WorkerIndex {
    vms: Vec<u32>,
    by_ipv4: HashMap<Ipv4Addr, u32>,
}

/// The state in force, and its indexes.
pub struct Snapshot {
    /// Each VM behind its own `Arc`, so that the next snapshot (an etcd change to one
    /// VM among 100k) shares every VM it did not change instead of copying it.
    vms: Vec<Arc<Vm>>,
    users: Vec<User>,
    generation: u64,
    loaded_at: SystemTime,
    routes: HashMap<(VmId, ServiceName), RouteEntry>,
    by_id: HashMap<VmId, u32>,
    by_ipv6: HashMap<Ipv6Addr, u32>,
    by_fingerprint: HashMap<Fingerprint, (u32, u16)>,
    workers: HashMap<Box<str>, WorkerIndex>,
}

impl Snapshot {
    /// Indexes a validated state. `generation` counts the snapshots of one registry.
    pub fn build(state: State, generation: u64) -> Snapshot {
        let vms = state.vms.into_iter().map(Arc::new).collect();
        Snapshot::from_parts(vms, state.users, generation)
    }

    /// [`Snapshot::build`] from VMs that may be shared with another snapshot.
    pub fn from_parts(vms: Vec<Arc<Vm>>, users: Vec<User>, generation: u64) -> Snapshot {
        let service_count = vms.iter().map(|v| v.services.len()).sum();
        let mut routes = HashMap::with_capacity(service_count);
        let mut by_id = HashMap::with_capacity(vms.len());
        let mut by_ipv6 = HashMap::with_capacity(vms.len());
        let mut workers: HashMap<Box<str>, WorkerIndex> = HashMap::new();
        for (i, vm) in vms.iter().enumerate() {
            let i = i as u32;
            by_id.insert(vm.id, i);
            by_ipv6.insert(vm.public_ipv6, i);
            for (s, service) in vm.services.iter().enumerate() {
                let entry = RouteEntry {
                    target: SocketAddrV6::new(vm.public_ipv6, service.port, 0, 0),
                    h2c: service.h2c,
                    service: s as u16,
                    vm: i,
                };
                routes.insert((vm.id, service.name), entry);
            }
            let worker = match workers.get_mut(vm.worker.as_str()) {
                Some(w) => w,
                None => workers.entry(vm.worker.as_str().into()).or_default(),
            };
            worker.vms.push(i);
            if let Some(v4) = vm.ipv4 {
                worker.by_ipv4.insert(v4, i);
            }
        }
        let mut by_fingerprint = HashMap::new();
        for (u, user) in users.iter().enumerate() {
            for (k, key) in user.ssh_keys.iter().enumerate() {
                by_fingerprint.insert(key.fingerprint, (u as u32, k as u16));
            }
        }
        Snapshot {
            vms,
            users,
            generation,
            loaded_at: SystemTime::now(),
            routes,
            by_id,
            by_ipv6,
            by_fingerprint,
            workers,
        }
    }

    /// An empty snapshot (generation 0): nothing routes.
    pub fn empty() -> Snapshot {
        Snapshot::build(State::default(), 0)
    }

    /// Counts the snapshots of one registry, from 1; 0 is the empty snapshot.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When it was built.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// Every VM, in state order.
    pub fn vms(&self) -> &[Arc<Vm>] {
        &self.vms
    }

    /// Every user.
    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// The service a parsed public host names.
    pub fn route(&self, host: &PublicHost) -> Option<Route<'_>> {
        let entry = self.routes.get(&(host.vm, host.service))?;
        Some(Route {
            entry,
            vms: &self.vms,
        })
    }

    /// Host header / `:authority` / SNI straight to a route.
    pub fn route_host(&self, host: &str, domain: &str) -> Result<Route<'_>, RouteError> {
        match parse_public_host(host, domain) {
            Ok(parsed) => self.route(&parsed).ok_or(RouteError::Unknown),
            Err(HostError::NotUnderDomain) => Err(RouteError::NotOurs),
            Err(HostError::Malformed) => Err(RouteError::Unknown),
        }
    }

    /// A VM by id.
    pub fn vm(&self, id: &VmId) -> Option<&Vm> {
        self.by_id.get(id).map(|&i| &*self.vms[i as usize])
    }

    /// A VM by its public IPv6 address.
    pub fn vm_by_ipv6(&self, addr: &Ipv6Addr) -> Option<&Vm> {
        self.by_ipv6.get(addr).map(|&i| &*self.vms[i as usize])
    }

    /// The VM of this worker that a packet with this source address came from, if any.
    ///
    /// IPv6 by public address (IPv4-mapped IPv6 is read as IPv4); IPv4 by the
    /// worker-local `ipv4` of the worker's VMs. A VM of another worker is not found.
    pub fn vm_by_source(&self, worker: &str, addr: IpAddr) -> Option<&Vm> {
        let addr = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        let vm = match addr {
            IpAddr::V6(v6) => self.vm_by_ipv6(&v6)?,
            IpAddr::V4(v4) => {
                let &i = self.workers.get(worker)?.by_ipv4.get(&v4)?;
                &*self.vms[i as usize]
            }
        };
        (vm.worker == worker).then_some(vm)
    }

    /// The user that owns a key, and the key.
    pub fn user_by_fingerprint(&self, fingerprint: &Fingerprint) -> Option<(&User, &SshKey)> {
        let &(u, k) = self.by_fingerprint.get(fingerprint)?;
        let user = &self.users[u as usize];
        Some((user, &user.ssh_keys[k as usize]))
    }

    /// The VMs placed on a worker, in state order.
    pub fn worker_vms<'a>(&'a self, worker: &str) -> impl Iterator<Item = &'a Vm> + 'a {
        let indexes = self
            .workers
            .get(worker)
            .map(|w| w.vms.as_slice())
            .unwrap_or_default();
        indexes.iter().map(|&i| &*self.vms[i as usize])
    }

    /// The names of every worker with at least one VM.
    pub fn workers(&self) -> impl Iterator<Item = &str> {
        self.workers.keys().map(|k| &**k)
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("vms", &self.vms.len())
            .field("users", &self.users.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmedge_model::parse_state;

    fn example() -> Snapshot {
        let text = include_str!("../../examples/state.json");
        Snapshot::build(parse_state(text).unwrap().value, 1)
    }

    #[test]
    fn routes_by_host() {
        let s = example();
        let r = s
            .route_host(
                "APP--6f1c2d3e0000400080000000000000aa.proxy.example.dev:443",
                "example.dev",
            )
            .unwrap();
        assert_eq!(r.service().port, 3000);
        assert_eq!(
            r.vm().id.to_string(),
            "6f1c2d3e-0000-4000-8000-0000000000aa"
        );
        assert!(!r.h2c());
        assert_eq!(r.target(), "[fd5e:ed00:1::2]:3000".parse().unwrap());
        assert!(s
            .route_host(
                "api-v2--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
                "example.dev"
            )
            .unwrap()
            .h2c());
        let unknown_service = s.route_host(
            "nope--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
            "example.dev",
        );
        let unknown_vm = s.route_host(
            "app--6f1c2d3e0000400080000000000000ab.proxy.example.dev",
            "example.dev",
        );
        let malformed = s.route_host("app.proxy.example.dev", "example.dev");
        assert_eq!(unknown_service.unwrap_err(), RouteError::Unknown);
        assert_eq!(unknown_vm.unwrap_err(), RouteError::Unknown);
        assert_eq!(malformed.unwrap_err(), RouteError::Unknown);
        assert_eq!(
            s.route_host("ssh.example.dev", "example.dev").unwrap_err(),
            RouteError::NotOurs
        );
    }

    #[test]
    fn vms_by_id_address_source_and_worker() {
        let s = example();
        let id = VmId::parse("6f1c2d3e-0000-4000-8000-0000000000aa").unwrap();
        assert_eq!(s.vm(&id).unwrap().id, id);
        assert_eq!(
            s.vm_by_ipv6(&"fd5e:ed00:1::2".parse().unwrap()).unwrap().id,
            id
        );
        assert_eq!(
            s.vm_by_source("worker-1", "fd5e:ed00:1::2".parse().unwrap())
                .unwrap()
                .id,
            id
        );
        assert_eq!(
            s.vm_by_source("worker-1", "198.18.1.2".parse().unwrap())
                .unwrap()
                .id,
            id
        );
        assert_eq!(
            s.vm_by_source("worker-1", "::ffff:198.18.1.2".parse().unwrap())
                .unwrap()
                .id,
            id
        );
        assert!(
            s.vm_by_source("worker-2", "fd5e:ed00:1::2".parse().unwrap())
                .is_none(),
            "another worker's VM"
        );
        assert!(s
            .vm_by_source("worker-2", "198.18.1.2".parse().unwrap())
            .is_none());
        assert!(s
            .vm_by_source("worker-1", "fd5e:ed00:1::99".parse().unwrap())
            .is_none());
        assert_eq!(s.worker_vms("worker-1").count(), 6);
        assert_eq!(s.worker_vms("worker-2").count(), 3);
        assert_eq!(s.worker_vms("worker-9").count(), 0);
        let mut workers: Vec<_> = s.workers().collect();
        workers.sort();
        assert_eq!(workers, ["worker-1", "worker-2"]);
    }

    #[test]
    fn users_by_fingerprint() {
        let s = example();
        for user in s.users() {
            for key in &user.ssh_keys {
                let (u, k) = s.user_by_fingerprint(&key.fingerprint).unwrap();
                assert_eq!((u.id.as_str(), k), (user.id.as_str(), key));
            }
        }
        assert!(s
            .user_by_fingerprint(&Fingerprint::from_bytes([7; 32]))
            .is_none());
    }
}
