//! `vmedge`: the one binary of the network edge.
//!
//! # Layout
//! - `main.rs`: the command line (clap) and exit codes: 0 ok, 1 bad input or failure
//!   (every error printed), 2 usage error.
//! - `config.rs`: the TOML config, every key with a default for `vmedge up`.
//! - `logging.rs`: tracing to stderr, text or JSON.
//! - `admin.rs`: the `/metrics` and `/healthz` endpoint of each server.
//! - `memory.rs`: free memory handed back to the system after each state change.
//! - `math.rs`: the C math functions the binary calls, so that it needs no `libm.so`.
//! - `cmd/`: one file per subcommand.

mod admin;
mod cmd;
mod config;
mod logging;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod math;
mod memory;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// The network edge of a microVM platform: HTTP(S) proxy, SSH gateway, DNS gate and
/// firewall for every VM.
#[derive(Debug, Parser)]
#[command(name = "vmedge", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "VMEDGE_LOG_FORMAT"
    )]
    log_format: LogFormat,

    /// Log level or filter (e.g. "debug", "info,vmedge_registry=debug"); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info", env = "VMEDGE_LOG")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the edge on loopback with the example config and state (examples/ when no config is given).
    Up {
        /// Config file; default: examples/vmedge.toml if present, else built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the worker agent: keep this host's nftables in step with the state.
    Worker {
        /// This worker's name, as VMs' `worker` field names it (overrides [worker] name).
        #[arg(long)]
        name: Option<String>,
        /// Config file; default: built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the HTTP(S) edge alone: <service>--<vmid>.proxy.<domain> to the VM.
    Edge {
        /// Take the listening sockets over from a running edge (then send it SIGQUIT).
        #[arg(long)]
        upgrade: bool,
        /// Config file; default: built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the SSH gateway alone: ssh <vmid>@ssh.<domain> into a VM with the user's key.
    SshGateway {
        #[command(subcommand)]
        action: Option<SshAction>,
        /// Config file; default: built-in defaults.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Run the DNS gate alone: per-VM DNS policy, filling this host's fqdn sets.
    Dns {
        /// The worker whose VMs are answered (overrides [worker] name).
        #[arg(long)]
        worker: Option<String>,
        /// Config file; default: built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Work with state documents.
    #[command(subcommand)]
    State(StateCommand),
    /// Work with firewall policies.
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum SshAction {
    /// Print the gateway's user CA public key and the sshd_config lines a VM image needs.
    Ca,
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Validate a state file; print every error with its JSON path (exit 1 if any).
    Check {
        /// The state file (JSON); "-" reads standard input.
        file: PathBuf,
    },
    /// Write a state file into etcd in one transaction (validated first: nothing is
    /// written on error); objects no longer in the file are deleted, equal ones untouched.
    Push {
        /// The state file (JSON); "-" reads standard input.
        file: PathBuf,
        /// etcd endpoints, comma-separated (http://host:2379,...).
        #[arg(long, env = "VMEDGE_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
    },
    /// Print the state held in etcd as a state file.
    Pull {
        /// etcd endpoints, comma-separated (http://host:2379,...).
        #[arg(long, env = "VMEDGE_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FirewallCommand {
    /// Validate one FirewallPolicy (seed 001 shape, or the older seed 002 shape).
    Check {
        /// The policy file (JSON); "-" reads standard input.
        policy: PathBuf,
        /// Print the policy as the worker reads it (current shape, canonical values).
        #[arg(long)]
        print: bool,
    },
    /// Print the nftables transaction for one worker's VMs.
    Compile {
        #[command(flatten)]
        target: cmd::firewall::Target,
    },
    /// Apply the worker's ruleset to this host's nftables as one transaction.
    Apply {
        #[command(flatten)]
        target: cmd::firewall::Target,
    },
    /// Show what `apply` would change in this host's table (a unified diff of nft listings).
    Diff {
        #[command(flatten)]
        target: cmd::firewall::Target,
    },
    /// Say which rule (or default) decides a packet of a VM.
    Explain(cmd::firewall::ExplainArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file; unknown keys and bad values are named with their line.
    Check {
        /// The config file (TOML).
        file: PathBuf,
        /// Print the config with every default filled in.
        #[arg(long)]
        print: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Up { config } => cmd::up::run(config.as_deref()),
        Command::Worker { name, config } => cmd::worker::run(config.as_deref(), name),
        Command::Edge { upgrade, config } => cmd::edge::run(config.as_deref(), upgrade),
        Command::SshGateway { action, config } => match action {
            None => cmd::ssh::run(config.as_deref()),
            Some(SshAction::Ca) => cmd::ssh::ca(config.as_deref()),
        },
        Command::Dns { worker, config } => cmd::dns::run(config.as_deref(), worker),
        Command::State(StateCommand::Check { file }) => cmd::state::check(&file),
        Command::State(StateCommand::Push { file, etcd }) => cmd::state::push(&file, etcd),
        Command::State(StateCommand::Pull { etcd }) => cmd::state::pull(etcd),
        Command::Firewall(FirewallCommand::Check { policy, print }) => {
            cmd::firewall::check(&policy, print)
        }
        Command::Firewall(FirewallCommand::Compile { target }) => cmd::firewall::compile(&target),
        Command::Firewall(FirewallCommand::Apply { target }) => cmd::firewall::apply(&target),
        Command::Firewall(FirewallCommand::Diff { target }) => cmd::firewall::diff(&target),
        Command::Firewall(FirewallCommand::Explain(args)) => cmd::firewall::explain(&args),
        Command::Config(ConfigCommand::Check { file, print }) => cmd::config::check(&file, print),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
