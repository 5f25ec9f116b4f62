//! The `discus` command line.

mod agent;
mod client;
mod image;
mod node_args;
mod serve;
mod teardown;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "discus",
    version,
    about = "Serve verified disc images as iSCSI targets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: text for people, json (one object per line) for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "DISCUS_LOG_FORMAT"
    )]
    log_format: crate::telemetry::LogFormat,
    /// Log level (error, warn, info, debug, trace) or a filter such as `discus=debug,kube=info`;
    /// overrides RUST_LOG.
    #[arg(long, global = true, env = "DISCUS_LOG_LEVEL")]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as multi-document YAML.
    Crds,
    /// Check manifest files or folders the way the apiserver and the agent will.
    ///
    /// Prints one line per problem, `file: Kind/namespace/name: field.path: what is wrong`, and
    /// exits with 1 when there is any; exits with 0 when every manifest is valid.
    Validate {
        /// Files or folders (searched recursively for *.yaml, *.yml and *.json).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
    },
    /// Work with the image store of a node.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Serve the resources of a folder of manifests from this machine, without a cluster.
    Serve(serve::ServeArgs),
    /// Run as a storage node's agent in a Kubernetes cluster (the DaemonSet's command).
    Agent(agent::AgentArgs),
    /// Remove every target discus created on this node (after its agent is gone), nothing else.
    Teardown(teardown::TeardownArgs),
    /// Connect this machine to a grant's target with open-iscsi: log in, find the block device,
    /// optionally mount it read-only; or list the grants for this machine (--list).
    Connect(client::ConnectArgs),
    /// Undo what `discus connect` did for a grant: unmount, log out, remove its node records.
    Disconnect(client::DisconnectArgs),
    /// Keep a grant held by heartbeat (spec.heartbeat): renew its Lease until interrupted, then
    /// release it, which ends access on every node.
    Hold(client::HoldArgs),
    /// Print the least RBAC a client needs for one grant: a Role limited to the grant, its CHAP
    /// Secret and its heartbeat Lease, the bindings, and the Lease (apply it as an administrator).
    ClientRbac(client::ClientRbacArgs),
    /// Show the status `discus serve` wrote: one line per resource.
    Status {
        /// The data directory `discus serve` uses.
        #[arg(long, default_value = "/var/lib/discus")]
        data_dir: PathBuf,
    },
}

/// Runs the command line and returns the process's exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Agent(_)) {
        "info"
    } else {
        "warn"
    };
    if let Err(error) =
        crate::telemetry::init(cli.log_format, cli.log_level.as_deref(), default_level)
    {
        return fail(&error);
    }
    match cli.command {
        Command::Crds => match crate::crds::render_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::Validate { paths } => validate(&paths),
        Command::Image { command } => image::run(command),
        Command::Serve(args) => serve::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Teardown(args) => teardown::run(args),
        Command::Connect(args) => client::connect(args),
        Command::Disconnect(args) => client::disconnect(args),
        Command::Hold(args) => client::hold(args),
        Command::ClientRbac(args) => client::client_rbac(args),
        Command::Status { data_dir } => {
            print!("{}", crate::standalone::status_table(&data_dir));
            let waiting = crate::standalone::not_ready_messages(&data_dir);
            if !waiting.is_empty() {
                println!();
                for message in waiting {
                    println!("{message}");
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("discus: {error}");
    ExitCode::FAILURE
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let report = crate::validate::validate_paths(paths);
    for finding in &report.findings {
        println!("{finding}");
    }
    eprintln!(
        "{} file(s), {} discus object(s) and Secret(s) checked, {} other object(s) skipped: {}",
        report.files,
        report.objects,
        report.skipped,
        match report.findings.len() {
            0 => "all valid".to_owned(),
            n => format!("{n} problem(s)"),
        }
    );
    if report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A multi-threaded runtime for the commands that do I/O.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
