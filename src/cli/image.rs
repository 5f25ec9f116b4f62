//! `discus image upload`: a local image into the cluster (see `client::upload`).
//!
//! `discus image fetch`: import one image into a node's store, for pre-seeding and tests.
//!
//! It runs as the node's operator (root on the node), not as a tenant: it finds and stores images
//! whoever they are for, and by itself entitles no namespace to what it stored — a DiscImage
//! still proves possession with its own source (a download and a hash, no second conversion).
//! `--namespace` is the operator vouching for namespaces explicitly: those get the image as if
//! their own source had delivered it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::disc_image::ImageFormat;
use crate::api::{quantity, rules};
use crate::client::{self, upload::UploadRequest};
use crate::desired::ObjectKey;
use crate::images::{
    self, DestinationPolicy, FetchOptions, HttpAuth, ImportRequest, Importer, ImporterConfig,
    Requester, Source,
};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Download (or copy) an image, verify its SHA-256, inspect it, convert it to raw if needed,
    /// and store it. Prints one JSON object:
    /// {"path","format","virtualSize","sha256","servedSha256"}.
    Fetch(FetchArgs),
    /// Upload a local image into the cluster as a DiscImage (docs/upload.md): hash it, declare
    /// the DiscImage, send the bytes to a storage node over HTTPS (resuming what the node holds),
    /// and wait until the node stored it.
    Upload(UploadArgs),
}

#[derive(Args)]
pub struct UploadArgs {
    /// The image file.
    file: PathBuf,
    /// The DiscImage's name.
    #[arg(long)]
    name: String,
    /// Its namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// auto, iso, raw, qcow2, vhdx or vmdk.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    format: ImageFormat,
    /// Return once the node verified the bytes, without waiting for it to store them.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for a node, the token, and the image, in seconds.
    #[arg(long, default_value = "600", value_parser = super::node_args::seconds)]
    timeout_seconds: std::time::Duration,
    /// Print one JSON object instead of text (progress stays on stderr).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
    /// The kubeconfig to use; otherwise as kubectl finds one.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["url", "file"])))]
pub struct FetchArgs {
    /// An http or https URL.
    #[arg(long)]
    url: Option<String>,
    /// A file on this machine.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The SHA-256 the image must have (64 lower-case hex digits).
    #[arg(long)]
    sha256: String,
    /// auto, iso, raw, qcow2, vhdx or vmdk.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    format: ImageFormat,
    /// The node's data directory; images go to DATA_DIR/images.
    #[arg(long, default_value = "/var/lib/discus")]
    data_dir: PathBuf,
    /// Refuse images larger than this once unpacked (for example 20Gi).
    #[arg(long, default_value = "128Gi", value_parser = parse_size)]
    max_virtual_size: u64,
    /// Allow downloads from loopback addresses.
    #[arg(long)]
    allow_loopback: bool,
    /// Entitle this namespace's DiscImages with the same SHA-256 to the stored image without a
    /// download of their own: you vouch for it (repeatable; default: none, each namespace proves
    /// possession with its own source).
    #[arg(long = "namespace", value_name = "NAMESPACE", value_parser = parse_namespace)]
    namespaces: Vec<String>,
}

fn parse_namespace(value: &str) -> Result<String, String> {
    rules::object_name(value)
        .map(|()| value.to_owned())
        .map_err(|e| format!("{value:?}: {e}"))
}

fn parse_format(value: &str) -> Result<ImageFormat, String> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| "must be one of auto, iso, raw, qcow2, vhdx or vmdk".to_owned())
}

fn parse_size(value: &str) -> Result<u64, String> {
    quantity::parse_bytes(&Quantity(value.to_owned())).map_err(|e| e.to_string())
}

pub fn run(command: ImageCommand) -> ExitCode {
    match command {
        ImageCommand::Upload(args) => print_or_fail(upload(args)),
        ImageCommand::Fetch(args) => print_or_fail(fetch(args)),
    }
}

/// Runs a command on a runtime of its own and prints what it says, or fails with its error.
fn print_or_fail(command: impl std::future::Future<Output = Result<String, String>>) -> ExitCode {
    let result = super::runtime()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(command));
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => super::fail(&message),
    }
}

async fn upload(args: UploadArgs) -> Result<String, String> {
    for (what, value) in [("--name", &args.name), ("--namespace", &args.namespace)] {
        rules::object_name(value).map_err(|e| format!("{what} {e}"))?;
    }
    let client = client::api_client(args.kubeconfig.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let request = UploadRequest {
        file: args.file,
        key: ObjectKey::new(&args.namespace, &args.name),
        format: args.format,
        wait: !args.no_wait,
        timeout: args.timeout_seconds,
        progress: true,
    };
    let uploaded = client::upload::upload(&client, &request)
        .await
        .map_err(|e| e.to_string())?;
    match args.output {
        Output::Json => serde_json::to_string(&uploaded).map_err(|e| e.to_string()),
        Output::Text => Ok(format!(
            "DiscImage {}/{} ({} bytes, sha256 {}) is {} on node {} ({:.1} s{})",
            uploaded.namespace,
            uploaded.name,
            uploaded.bytes,
            uploaded.sha256,
            if request.wait { "stored" } else { "verified" },
            match uploaded.nodes.join(", ") {
                nodes if nodes.is_empty() => "(uploaded before)".to_owned(),
                nodes => nodes,
            },
            uploaded.seconds,
            if uploaded.resumed_from > 0 {
                format!(", resumed at byte {}", uploaded.resumed_from)
            } else {
                String::new()
            }
        )),
    }
}

async fn fetch(args: FetchArgs) -> Result<String, String> {
    rules::sha256_hex(&args.sha256).map_err(|e| format!("--sha256 {e}"))?;
    let (source, file_roots) = match (args.url, args.file) {
        (Some(url), None) => {
            let url = rules::http_url(&url).map_err(|e| format!("--url {e}"))?;
            (
                Source::Http {
                    url,
                    auth: HttpAuth::default(),
                },
                Vec::new(),
            )
        }
        (None, Some(path)) => {
            // The operator names the file: its own folder is the root it may be read from.
            let real =
                std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let root = real
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"));
            (Source::File { path: real }, vec![root])
        }
        _ => return Err("give exactly one of --url and --file".into()),
    };
    let importer = Importer::new(ImporterConfig {
        upload: Default::default(),
        data_dir: args.data_dir,
        file_roots,
        fetch: FetchOptions {
            destinations: DestinationPolicy::new(args.allow_loopback, Vec::new(), Vec::new()),
            ..FetchOptions::default()
        },
        qemu: images::qemu::QemuImg::default(),
        peer_keys: None,
    })
    .map_err(|e| e.to_string())?;
    let request = ImportRequest {
        requester: Requester::Operator,
        source,
        sha256: args.sha256,
        format: args.format,
        max_virtual_size: args.max_virtual_size,
    };
    let stored = importer
        .import(&request, &mut images::ProgressReporter::silent())
        .await
        .map_err(|e| e.to_string())?;
    for namespace in args.namespaces {
        importer
            .store()
            .entitle(&stored.sha256, &Requester::Namespace(namespace))
            .map_err(|e| e.to_string())?;
    }
    serde_json::to_string(&stored).map_err(|e| e.to_string())
}
