//! VMs: id, owner, placement, address, status, services, firewall, host keys.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Serialize, Serializer};
use uuid::Uuid;

use crate::json::Node;
use crate::policy::{decode_policy, effective_policy, FirewallPolicy};
use crate::service::{Service, ServiceName, SERVICE_PORT_MIN};
use crate::user::SshKey;
use crate::validate::{
    array, boolean, object, optional, required, required_string, string, Path, Report,
};

/// The value of each ASCII hex digit; 0xff for every other byte.
const HEX_DIGIT: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// A VM id: a UUID. Shown hyphenated; in public hosts as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(Uuid);

impl VmId {
    /// Parses the hyphenated (36) or the simple (32 hex) form, any case.
    pub fn parse(s: &str) -> Option<VmId> {
        match s.len() {
            32 | 36 => Uuid::try_parse(s).ok().map(VmId),
            _ => None,
        }
    }

    /// Parses exactly 32 hex digits, any case (the form in public hosts).
    pub fn parse_hex32(s: &str) -> Option<VmId> {
        // On every request. Independent table loads packed two digits a byte: no chain
        // of dependent shifts, so the CPU overlaps them.
        let text: &[u8; 32] = s.as_bytes().try_into().ok()?;
        let mut bytes = [0u8; 16];
        let mut bad = 0u8;
        for (k, byte) in bytes.iter_mut().enumerate() {
            let (h, l) = (
                HEX_DIGIT[text[2 * k] as usize],
                HEX_DIGIT[text[2 * k + 1] as usize],
            );
            bad |= h | l;
            *byte = h << 4 | (l & 0x0f);
        }
        (bad & 0xf0 == 0).then_some(VmId(Uuid::from_bytes(bytes)))
    }

    /// From a UUID.
    pub fn from_uuid(uuid: Uuid) -> VmId {
        VmId(uuid)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// 32 lowercase hex digits, no hyphens: the form in public hosts.
    pub fn hex(&self) -> impl fmt::Display + '_ {
        self.0.simple()
    }
}

impl FromStr for VmId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmId::parse(s)
            .ok_or_else(|| format!("{s:?} is not a VM id (a UUID, hyphenated or 32 hex digits)"))
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for VmId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Lifecycle status (seed 001). Unknown values are kept and treated as "in transition",
/// as the seed asks clients to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmStatus {
    /// Being created.
    Provisioning,
    /// Up and serving.
    Running,
    /// Stopped (terminal).
    Stopped,
    /// On its way to paused.
    Pausing,
    /// Paused: woken on demand.
    Paused,
    /// On its way back from paused.
    Resuming,
    /// Being deleted.
    Deleting,
    /// Failed (terminal).
    Error,
    /// A status this build does not know.
    Other(Box<str>),
}

impl VmStatus {
    /// Every status seed 001 names.
    pub const KNOWN: [VmStatus; 8] = [
        VmStatus::Provisioning,
        VmStatus::Running,
        VmStatus::Stopped,
        VmStatus::Pausing,
        VmStatus::Paused,
        VmStatus::Resuming,
        VmStatus::Deleting,
        VmStatus::Error,
    ];

    /// The API's name for it.
    pub fn as_str(&self) -> &str {
        match self {
            VmStatus::Provisioning => "provisioning",
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
            VmStatus::Pausing => "pausing",
            VmStatus::Paused => "paused",
            VmStatus::Resuming => "resuming",
            VmStatus::Deleting => "deleting",
            VmStatus::Error => "error",
            VmStatus::Other(s) => s,
        }
    }

    fn parse(s: &str) -> VmStatus {
        VmStatus::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| VmStatus::Other(s.into()))
    }

    /// Traffic can flow now.
    pub fn is_running(&self) -> bool {
        *self == VmStatus::Running
    }

    /// A request should wake it and wait (paused, pausing, resuming).
    pub fn wakes_on_request(&self) -> bool {
        matches!(
            self,
            VmStatus::Paused | VmStatus::Pausing | VmStatus::Resuming
        )
    }

    /// It will not serve: stopped, deleting, error.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VmStatus::Stopped | VmStatus::Deleting | VmStatus::Error
        )
    }
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for VmStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A VM as the edge sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vm {
    /// VM id.
    pub id: VmId,
    /// Owning org.
    pub org_id: String,
    /// Worker the VM runs on.
    pub worker: String,
    /// The VM's address: the only one the edge and gateway dial.
    pub public_ipv6: Ipv6Addr,
    /// Lifecycle status.
    pub status: VmStatus,
    /// Registered services, names unique.
    pub services: Vec<Service>,
    /// The user's policy (not the effective one: see [`Vm::effective_policy`]).
    pub firewall: FirewallPolicy,
    /// Host keys the gateway accepts from the VM's sshd; `None` when the state names none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_host_keys: Option<Vec<SshKey>>,
    /// Worker-local: the VM's tap interface.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Worker-local: the VM's IPv4 address on its tap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
}

impl Vm {
    /// The policy the worker enforces: the VM's policy plus one ingress allow per service.
    pub fn effective_policy(&self) -> FirewallPolicy {
        effective_policy(&self.firewall, &self.services)
    }

    /// The service of that name.
    pub fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.services.iter().find(|s| s.name == *name)
    }
}

/// A Linux interface name: 1–15 bytes, no '/', ':' or white space.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_graphic() && c != b'/' && c != b':')
}

/// What decoding one VM object came to.
pub(crate) enum DecodedVm {
    /// Every field is valid.
    Valid(Vm),
    /// Only the firewall policy is invalid: the VM with [`FirewallPolicy::closed`].
    Fenced(Vm),
    /// Other fields are invalid too; the id, when it could be read.
    Invalid(Option<VmId>),
}

pub(crate) fn decode_vm(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<Vm> {
    match decode_vm_checked(v, path, report) {
        DecodedVm::Valid(vm) => Some(vm),
        DecodedVm::Fenced(_) | DecodedVm::Invalid(_) => None,
    }
}

/// Decodes one VM, telling an invalid policy (the VM can still be fenced) from a broken VM.
pub(crate) fn decode_vm_checked(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> DecodedVm {
    let Some(map) = object(v, path, report) else {
        return DecodedVm::Invalid(None);
    };
    let errors_before = report.errors.len();

    let id_path = path.field("id");
    let id = required_string(map, "id", path, report).and_then(|s| match VmId::parse(s) {
        Some(id) => Some(id),
        None => {
            report.error(&id_path, format!("{s:?} is not a VM id (a UUID)"));
            None
        }
    });
    let org_id = required_string(map, "org_id", path, report);
    let worker = required_string(map, "worker", path, report);

    let ip_path = path.field("public_ipv6");
    let public_ipv6 = required_string(map, "public_ipv6", path, report).and_then(|s| match s
        .parse::<Ipv6Addr>()
    {
        Ok(a) if a.is_unspecified() || a.is_multicast() => {
            report.error(&ip_path, format!("{s:?} cannot be a VM's address"));
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            report.error(&ip_path, format!("{s:?} is not an IPv6 address"));
            None
        }
    });

    let status_path = path.field("status");
    let status = required_string(map, "status", path, report).map(|s| {
        let status = VmStatus::parse(s);
        if let VmStatus::Other(_) = status {
            report.warn(
                &status_path,
                format!("{s:?} is not a status this build knows; treated as in transition"),
            );
        }
        status
    });

    let mut services = Vec::new();
    if let Some(v) = optional(map, "services") {
        let p = path.field("services");
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            let sp = p.index(i);
            if let Some(service) = decode_service(item, &sp, report) {
                // A VM has a handful of services: a scan beats a set.
                if services.iter().any(|s: &Service| s.name == service.name) {
                    report.error(
                        &sp.field("name"),
                        format!("{:?} is registered twice on this VM", service.name.as_str()),
                    );
                }
                services.push(service);
            }
        }
    }

    let policy_errors_before = report.errors.len();
    let firewall = match optional(map, "firewall") {
        Some(v) => decode_policy(v, &path.field("firewall"), report).map(|(p, _)| p),
        None => Some(FirewallPolicy::default()),
    };
    let policy_errors = report.errors.len() - policy_errors_before;

    let ssh_host_keys = optional(map, "ssh_host_keys").map(|v| {
        let p = path.field("ssh_host_keys");
        let mut keys = Vec::new();
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            let kp = p.index(i);
            if let Some(text) = string(item, &kp, report) {
                match SshKey::parse_openssh("", text) {
                    Ok(k) => keys.push(k),
                    Err(e) => report.error(&kp, e.to_string()),
                }
            }
        }
        keys
    });

    let if_path = path.field("interface");
    let interface = optional(map, "interface")
        .and_then(|v| string(v, &if_path, report))
        .and_then(|s| {
            if valid_ifname(s) {
                Some(s.to_string())
            } else {
                report.error(
                    &if_path,
                    format!(
                        "{s:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"
                    ),
                );
                None
            }
        });
    let v4_path = path.field("ipv4");
    let ipv4 = optional(map, "ipv4")
        .and_then(|v| string(v, &v4_path, report))
        .and_then(|s| match s.parse::<Ipv4Addr>() {
            Ok(a) if a.is_unspecified() || a.is_multicast() || a.is_broadcast() => {
                report.error(&v4_path, format!("{s:?} cannot be a VM's address"));
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                report.error(&v4_path, format!("{s:?} is not an IPv4 address"));
                None
            }
        });
    if ipv4.is_some() && optional(map, "interface").is_none() {
        report.error(
            &v4_path,
            "needs \"interface\": IPv4 traffic is attributed to a VM only through its tap",
        );
    }

    let errors = report.errors.len() - errors_before;
    let (Some(id), Some(org_id), Some(worker), Some(public_ipv6), Some(status)) =
        (id, org_id, worker, public_ipv6, status)
    else {
        return DecodedVm::Invalid(id);
    };
    if errors != policy_errors {
        return DecodedVm::Invalid(Some(id));
    }
    let vm = |firewall| Vm {
        id,
        org_id: org_id.to_string(),
        worker: worker.to_string(),
        public_ipv6,
        status,
        services,
        firewall,
        ssh_host_keys,
        interface,
        ipv4,
    };
    match firewall {
        Some(firewall) if errors == 0 => DecodedVm::Valid(vm(firewall)),
        _ => DecodedVm::Fenced(vm(FirewallPolicy::closed())),
    }
}

fn decode_service(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<Service> {
    let map = object(v, path, report)?;
    let name_path = path.field("name");
    let name = required(map, "name", path, report)
        .and_then(|v| string(v, &name_path, report))
        .and_then(|s| match ServiceName::parse(s) {
            Ok(n) => Some(n),
            Err(e) => {
                report.error(&name_path, format!("{s:?} {e}"));
                None
            }
        });
    let port_path = path.field("port");
    let port = required(map, "port", path, report).and_then(|v| match v.as_u64() {
        Some(p) if (u64::from(SERVICE_PORT_MIN)..=65535).contains(&p) => Some(p as u16),
        Some(p) => {
            report.error(
                &port_path,
                format!("{p} is not allowed: service ports are {SERVICE_PORT_MIN}-65535 (privileged ports are rejected)"),
            );
            None
        }
        None => {
            report.error(&port_path, format!("expected a port number, found {v}"));
            None
        }
    });
    let h2c = match optional(map, "h2c") {
        Some(v) => boolean(v, &path.field("h2c"), report),
        None => Some(false),
    };
    Some(Service {
        name: name?,
        port: port?,
        h2c: h2c?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_id_forms() {
        let a = VmId::parse("6f1c2d3e-0000-4000-8000-0000000000aa").unwrap();
        let b = VmId::parse("6F1C2D3E000040008000000000000000AA".get(..32).unwrap());
        assert!(b.is_some());
        assert_eq!(a.hex().to_string(), "6f1c2d3e0000400080000000000000aa");
        assert_eq!(
            VmId::parse_hex32("6F1C2D3E0000400080000000000000AA"),
            Some(a)
        );
        assert_eq!(
            VmId::parse_hex32("6f1c2d3e-0000-4000-8000-0000000000aa"),
            None
        );
        assert_eq!(VmId::parse("{6f1c2d3e-0000-4000-8000-0000000000aa}"), None);
        assert_eq!(VmId::parse("vm-1"), None);
        assert_eq!(VmId::parse_hex32("+f1c2d3e0000400080000000000000aa"), None);
    }

    #[test]
    fn statuses() {
        for s in VmStatus::KNOWN {
            assert_eq!(VmStatus::parse(s.as_str()), s);
        }
        assert!(VmStatus::Paused.wakes_on_request());
        assert!(VmStatus::Resuming.wakes_on_request());
        assert!(VmStatus::Stopped.is_unavailable());
        assert!(!VmStatus::parse("hibernating").is_unavailable());
        assert!(!VmStatus::parse("hibernating").is_running());
    }

    #[test]
    fn ifnames() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("vm-123456789012"));
        assert!(!valid_ifname("vm-1234567890123"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
        assert!(!valid_ifname(""));
    }
}
