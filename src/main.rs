//! The `discus` command.

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crds => match discus::crds::render_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("discus: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Validate { paths } => {
            let report = discus::validate::validate_paths(&paths);
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
    }
}
