//! The platform's objects as its API defines them (seed 001): VMs, services, users,
//! SSH keys and firewall policies, with parsing and validation. No I/O.
//!
//! # Layout
//! - [`state`]: the state document (users and VMs) and the entry points
//!   [`parse_state`], [`parse_vm`], [`parse_user`], [`parse_policy`].
//! - [`vm`]: [`Vm`], [`VmId`], [`VmStatus`].
//! - [`service`]: [`Service`], [`ServiceName`] (inline, never allocates).
//! - [`host`]: [`public_host`] and [`parse_public_host`]: `<service>--<vmid>.proxy.<domain>`.
//! - [`user`]: [`User`], [`SshKey`], [`Fingerprint`] (as `ssh-keygen -lf` prints it).
//! - [`policy`]: [`FirewallPolicy`] in the seed 001 shape and the older seed 002 shape,
//!   and [`effective_policy`].
//! - [`domain`]: [`DomainPattern`], `example.com` or `*.example.com`.
//! - [`rate`]: [`RateLimit`], [`TokenBucket`]: a per-VM budget (edge requests, DNS queries).
//! - `json`: a borrowed JSON tree (strings borrow from the input): what is walked.
//! - `validate`: the decoder that walks it with the JSON path and collects every error.
//! - [`errors`]: [`ModelError`], [`FieldError`]: each error names its JSON path.
//!
//! Documents are validated as a whole: [`ModelError::Invalid`] carries every error,
//! e.g. `vms[3].firewall.egress.rules[2].ports: "80-" is not a port or a range`.

pub mod domain;
pub mod errors;
pub mod host;
mod json;
pub mod policy;
pub mod rate;
pub mod service;
pub mod state;
pub mod user;
mod validate;
pub mod vm;

pub use domain::{DomainError, DomainPattern};
pub use errors::{FieldError, FieldErrors, ModelError};
pub use host::{parse_public_host, public_host, HostError, PublicHost};
pub use policy::{
    effective_policy, Action, DirectionPolicy, DnsMode, DnsPolicy, FirewallPolicy, PolicyShape,
    Ports, Protocol, Rule, Target,
};
pub use rate::{RateLimit, TokenBucket};
pub use service::{Service, ServiceName, ServiceNameError};
pub use state::{
    parse_policy, parse_state, parse_state_isolating, parse_user, parse_vm, parse_vm_checked,
    state_from_value, InvalidVm, Parsed, PartialState, Quarantined, RejectedVm, Resolved, StandIn,
    State,
};
pub use user::{Fingerprint, KeyAlgorithm, SshKey, SshKeyError, User};
pub use vm::{Vm, VmId, VmStatus};
