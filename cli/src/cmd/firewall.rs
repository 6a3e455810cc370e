//! `vmedge firewall check | compile | apply | explain`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use vmedge_firewall::canonical::PacketProto;
use vmedge_firewall::{CompileOptions, Direction, FirewallBackend, NftBackend, Packet};
use vmedge_model::{PolicyShape, VmId};

use super::{print_model_error, print_warnings, read_input};

/// Validates one policy document; `print` shows it as the worker reads it.
pub fn check(file: &Path, print: bool) -> anyhow::Result<ExitCode> {
    let text = read_input(file)?;
    match vmedge_model::parse_policy(&text) {
        Ok(parsed) => {
            print_warnings(file, &parsed.warnings);
            let (policy, shape) = parsed.value;
            if print {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                let shape = match shape {
                    PolicyShape::Current => "seed 001 shape",
                    PolicyShape::Legacy => "seed 002 shape, converted",
                };
                println!(
                    "{}: ok ({shape}): ingress {} rules, default {}; egress {} rules, default {}; dns {} mode with {} domains",
                    file.display(),
                    policy.ingress.rules.len(),
                    policy.ingress.default,
                    policy.egress.rules.len(),
                    policy.egress.default,
                    policy.dns.mode,
                    policy.dns.domains.len(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            print_model_error(file, &e);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Which worker's VMs, from which state.
#[derive(Debug, Args)]
pub struct Target {
    /// The state file (JSON).
    #[arg(long)]
    state: PathBuf,
    /// The worker whose VMs are compiled.
    #[arg(long)]
    worker: String,
    /// The worker's DNS gate address: the only place VMs may send port 53 (repeatable).
    #[arg(long = "dns-gate", default_value = "fd5e:ed00::53")]
    dns_gates: Vec<IpAddr>,
}

fn ruleset(target: &Target) -> anyhow::Result<Option<vmedge_firewall::Ruleset>> {
    let Some(state) = super::load_state(&target.state)? else {
        return Ok(None);
    };
    let vms = state.vms.iter().filter(|v| v.worker == target.worker);
    Ok(Some(vmedge_firewall::compile(
        &target.worker,
        vms,
        &CompileOptions::new(target.dns_gates.clone()),
    )))
}

/// Prints the transaction.
pub fn compile(target: &Target) -> anyhow::Result<ExitCode> {
    match ruleset(target)? {
        Some(ruleset) => {
            print!("{}", ruleset.text);
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::FAILURE),
    }
}

/// Applies the transaction with `nft -f -`; stale per-VM objects are deleted with it.
pub fn apply(target: &Target) -> anyhow::Result<ExitCode> {
    let Some(ruleset) = ruleset(target)? else {
        return Ok(ExitCode::FAILURE);
    };
    let nft = NftBackend::new();
    let version = nft.check_version()?;
    nft.apply(&ruleset)?;
    let vms = ruleset.vms;
    println!(
        "applied: table inet vmedge, {vms} VMs of worker {:?} ({version})",
        target.worker
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints what an apply would change. The desired table is loaded into a throwaway
/// network namespace so that nft lists both sides in its own normal form.
pub fn diff(target: &Target) -> anyhow::Result<ExitCode> {
    let Some(ruleset) = ruleset(target)? else {
        return Ok(ExitCode::FAILURE);
    };
    let host = NftBackend::new();
    host.check_version()?;
    let live = host.list_table()?;
    let scratch = ScratchNetns::create()?;
    let in_scratch = NftBackend::in_netns(&scratch.0);
    in_scratch.run(&ruleset.text)?;
    let desired = in_scratch.list_table()?;
    let diff = vmedge_firewall::diff::diff_listings(&live, &desired);
    if diff.is_empty() {
        println!("no changes: the live table is what apply would make it");
    } else {
        print!("{diff}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A network namespace that exists for one command and is deleted after it.
struct ScratchNetns(String);

impl ScratchNetns {
    fn create() -> anyhow::Result<ScratchNetns> {
        let name = format!("vmedge-diff-{}", std::process::id());
        let status = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .context("cannot run ip (iproute2) to make a scratch namespace")?;
        anyhow::ensure!(
            status.success(),
            "ip netns add {name} failed (diff needs root)"
        );
        Ok(ScratchNetns(name))
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A direction on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dir {
    /// Traffic to the VM.
    Ingress,
    /// Traffic from the VM.
    Egress,
}

/// A transport protocol on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Proto {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// Anything without ports (ICMP, ...)
    Other,
}

/// `vmedge firewall explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The state file (JSON).
    #[arg(long)]
    state: PathBuf,
    /// The VM (UUID or 32 hex).
    #[arg(long)]
    vm: VmId,
    /// ingress (to the VM) or egress (from it).
    #[arg(long, value_enum)]
    dir: Dir,
    /// The far side: the source for ingress, the destination for egress.
    #[arg(long)]
    addr: IpAddr,
    /// Transport protocol.
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
    /// The VM's port (ingress) or the destination port (egress).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The worker's DNS gate address (repeatable).
    #[arg(long = "dns-gate", default_value = "fd5e:ed00::53")]
    dns_gates: Vec<IpAddr>,
}

/// Prints the verdict and the rule that decided it. fqdn rules are taken to match
/// nothing: which addresses they hold depends on DNS answers at run time.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let Some(state) = super::load_state(&args.state)? else {
        return Ok(ExitCode::FAILURE);
    };
    let vm = state
        .vms
        .iter()
        .find(|v| v.id == args.vm)
        .with_context(|| format!("{}: no VM {}", args.state.display(), args.vm))?;
    let packet = Packet {
        direction: match args.dir {
            Dir::Ingress => Direction::Ingress,
            Dir::Egress => Direction::Egress,
        },
        remote: args.addr,
        proto: match args.proto {
            Proto::Tcp => PacketProto::Tcp,
            Proto::Udp => PacketProto::Udp,
            Proto::Other => PacketProto::Other,
        },
        port: args.port,
    };
    let options = CompileOptions::new(args.dns_gates.clone());
    println!(
        "{}",
        vmedge_firewall::explain(vm, &options, &packet, &|_, _| false)
    );
    Ok(ExitCode::SUCCESS)
}
