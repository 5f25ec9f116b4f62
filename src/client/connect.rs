//! `discus connect` and `discus disconnect`: from a grant's status to a block device, and back.
//!
//! connect reads the grant and its CHAP Secret with the client's own credentials, creates an
//! open-iscsi node record for every portal (CHAP written into the record, never on a command
//! line), logs in, and waits for the LUN's block device, found by the unit serial the storage
//! nodes present. What it created is written down (a small file per grant in the state folder)
//! before it logs in, so that disconnect removes exactly that — its records, its mount, its
//! sessions — and nothing another tool made. Both are idempotent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use super::devices::{self, Device, Roots};
use super::open_iscsi::{InitiatorError, Iscsiadm, Node};
use super::{ClientError, explain};
use crate::api::InitiatorAccess;
use crate::api::chap::{ChapCredentials, secret_data};
use crate::api::initiator_access::{Connection, InitiatorAccessStatus};
use crate::desired::{ObjectKey, object_key};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(250);

impl From<InitiatorError> for ClientError {
    fn from(error: InitiatorError) -> Self {
        Self::Refused(error.to_string())
    }
}

/// The client machine: its credentials, its open-iscsi and its kernel's views.
pub struct Machine {
    pub api: Client,
    pub iscsiadm: Iscsiadm,
    pub roots: Roots,
    /// Where connect writes down what it created.
    pub state_dir: PathBuf,
    /// This machine's initiator name.
    pub initiator: String,
}

/// One grant this machine may use, for `--list`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub target: String,
    pub luns: Vec<u32>,
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub ready: bool,
    pub reason: String,
}

/// The grants for this machine's initiator name, in `namespace` or in all the caller can list.
pub async fn list(
    api: &Client,
    namespace: Option<&str>,
    initiator: &str,
) -> Result<Vec<Listed>, ClientError> {
    let grants: Api<InitiatorAccess> = match namespace {
        Some(namespace) => Api::namespaced(api.clone(), namespace),
        None => Api::all(api.clone()),
    };
    let listed = grants
        .list(&ListParams::default())
        .await
        .map_err(|e| match &e {
            kube::Error::Api(status) if status.code == 403 => ClientError::Refused(format!(
                "403 Forbidden: this client may not list InitiatorAccesses in {}; `discus \
             client-rbac GRANT -n NAMESPACE --allow-list` binds the role that lets it",
                namespace.unwrap_or("every namespace")
            )),
            _ => ClientError::Api(format!("cannot list InitiatorAccesses: {e}")),
        })?;
    let mut mine: Vec<Listed> = (listed.items.iter())
        .filter(|g| g.spec.initiator_iqn == initiator)
        .map(listed_grant)
        .collect();
    mine.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(mine)
}

fn listed_grant(grant: &InitiatorAccess) -> Listed {
    let key = object_key(&grant.metadata);
    let (ready, reason) = readiness(grant.status.as_ref());
    let status_luns = (grant.status.as_ref())
        .and_then(|s| s.connection.as_ref())
        .map(|c| c.luns.iter().map(|l| l.lun).collect());
    Listed {
        namespace: key.namespace,
        name: key.name,
        target: grant.spec.target_ref.name.clone(),
        luns: (grant.spec.luns.clone())
            .or(status_luns)
            .unwrap_or_default(),
        read_only: grant.spec.read_only,
        expires_at: grant.spec.expires_at.clone(),
        ready,
        reason,
    }
}

/// Whether the grant's Ready condition is true, and its reason and message.
fn readiness(status: Option<&InitiatorAccessStatus>) -> (bool, String) {
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) => (c.status == "True", format!("{}: {}", c.reason, c.message)),
        None => (false, "no status yet: is an agent running?".to_owned()),
    }
}

/// What connect made ready.
#[derive(Debug)]
pub struct Connected {
    /// Per LUN of the grant: its devices (one per portal logged in to).
    pub luns: Vec<(u32, Vec<Device>)>,
    pub mounted: Option<PathBuf>,
    /// From the start of connect to the devices found.
    pub elapsed: Duration,
}

/// What connect created for a grant, as written in the state folder.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Made {
    target: String,
    /// The portals whose node records connect created (and logs in to).
    records: Vec<SocketAddr>,
    mount: Option<PathBuf>,
}

/// Connects this machine to the grant `key`: records, logins, devices, and a read-only mount
/// at `mount` when asked. Waits `deadline` at most for the grant to be Ready and the devices.
pub async fn connect(
    client: &Machine,
    key: &ObjectKey,
    mount: Option<&Path>,
    deadline: Duration,
) -> Result<Connected, ClientError> {
    let started = Instant::now();
    let grant = ready_grant(client, key, started + deadline).await?;
    let connection = (grant.status.as_ref())
        .and_then(|s| s.connection.clone())
        .ok_or_else(|| ClientError::Api(format!("InitiatorAccess {key} has no connection yet")))?;
    let chap = credentials(client, key, &grant).await?;
    client.iscsiadm.check_iscsid().await?;
    let nodes = nodes(&connection)?;
    let mut made = Made::read(&client.state_dir, key)?;
    made.target.clone_from(&connection.iqn);
    for node in &nodes {
        ensure_record(client, key, node, chap.as_ref(), &mut made).await?;
    }
    login_any(&client.iscsiadm, &nodes).await?;
    let luns = wait_for_devices(&client.roots, &connection, started + deadline).await?;
    let elapsed = started.elapsed();
    let mounted = match mount {
        Some(dir) => Some(mount_first(&luns, dir, key, &client.state_dir, &mut made).await?),
        None => None,
    };
    Ok(Connected {
        luns,
        mounted,
        elapsed,
    })
}

/// The grant once it is Ready, checked to be this machine's.
async fn ready_grant(
    client: &Machine,
    key: &ObjectKey,
    until: Instant,
) -> Result<InitiatorAccess, ClientError> {
    let api: Api<InitiatorAccess> = Api::namespaced(client.api.clone(), &key.namespace);
    loop {
        let grant =
            (api.get(&key.name).await).map_err(|e| explain(&e, "get", "InitiatorAccess", key))?;
        if grant.spec.initiator_iqn != client.initiator {
            return Err(ClientError::Refused(format!(
                "InitiatorAccess {key} is for {}, and this machine is {} (its initiator name; \
                 --initiator-iqn sets another)",
                grant.spec.initiator_iqn, client.initiator
            )));
        }
        let (ready, why) = readiness(grant.status.as_ref());
        if ready {
            return Ok(grant);
        }
        let expired = why.starts_with("Expired");
        if expired || Instant::now() + POLL > until {
            return Err(ClientError::Refused(format!(
                "InitiatorAccess {key} is not Ready: {why}"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The grant's CHAP credentials from its Secret, if it uses CHAP.
async fn credentials(
    client: &Machine,
    key: &ObjectKey,
    grant: &InitiatorAccess,
) -> Result<Option<ChapCredentials>, ClientError> {
    let Some(chap) = &grant.spec.chap else {
        return Ok(None);
    };
    let secret_key = key.sibling(&chap.secret_ref.name);
    let secrets: Api<Secret> = Api::namespaced(client.api.clone(), &key.namespace);
    let secret = (secrets.get(&secret_key.name).await)
        .map_err(|e| explain(&e, "get", "Secret", &secret_key))?;
    ChapCredentials::from_secret_data(&secret_data(&secret), chap.mutual)
        .map(Some)
        .map_err(|errors| ClientError::Refused(format!("Secret {secret_key}: {errors}")))
}

fn nodes(connection: &Connection) -> Result<Vec<Node>, ClientError> {
    connection
        .portals
        .iter()
        .map(|portal| {
            let portal = portal.parse::<SocketAddr>().map_err(|_| {
                ClientError::Api(format!(
                    "status.connection.portals: {portal:?} is not address:port"
                ))
            })?;
            Ok(Node {
                target: connection.iqn.clone(),
                portal,
            })
        })
        .collect()
}

/// The node record of `node`, made by connect (now, or before): CHAP set as the Secret says
/// now. A record connect did not make is left alone, and connect stops.
async fn ensure_record(
    client: &Machine,
    key: &ObjectKey,
    node: &Node,
    chap: Option<&ChapCredentials>,
    made: &mut Made,
) -> Result<(), ClientError> {
    let exists = client.iscsiadm.has_record(node).await?;
    let ours = made.records.contains(&node.portal);
    if exists && !ours {
        return Err(ClientError::Refused(format!(
            "a node record for {} at {} exists that discus connect did not create; remove it \
             (iscsiadm -m node -T {} -p {} -o delete) or log in with it yourself",
            node.target, node.portal, node.target, node.portal
        )));
    }
    if exists {
        // Credentials may have changed since: the record says what the Secret says now.
        return Ok(client.iscsiadm.set_chap(node, chap)?);
    }
    // Written down first: a connect that dies now leaves nothing disconnect cannot find.
    if !ours {
        made.records.push(node.portal);
        made.write(&client.state_dir, key)?;
    }
    Ok(client.iscsiadm.create_record(node, chap).await?)
}

/// Logs in at every portal; one path is enough, the others are said.
async fn login_any(iscsiadm: &Iscsiadm, nodes: &[Node]) -> Result<(), ClientError> {
    let mut refused = Vec::new();
    for node in nodes {
        if let Err(error) = iscsiadm.login(node).await {
            refused.push(error.to_string());
        }
    }
    if refused.len() == nodes.len() {
        return Err(ClientError::Refused(refused.join("; ")));
    }
    for why in refused {
        eprintln!("warning: {why}");
    }
    Ok(())
}

async fn wait_for_devices(
    roots: &Roots,
    connection: &Connection,
    until: Instant,
) -> Result<Vec<(u32, Vec<Device>)>, ClientError> {
    loop {
        let found: Vec<(u32, Vec<Device>)> = (connection.luns.iter())
            .map(|l| {
                let number = l.device_lun.unwrap_or(l.lun);
                let devices = devices::find(roots, &connection.iqn, number, l.serial.as_deref());
                (l.lun, devices)
            })
            .collect();
        let missing: Vec<u32> = (found.iter())
            .filter(|(_, d)| d.is_empty())
            .map(|(lun, _)| *lun)
            .collect();
        if missing.is_empty() {
            return Ok(found);
        }
        if Instant::now() + POLL > until {
            return Err(ClientError::Refused(format!(
                "logged in to {}, but no block device of LUN(s) {missing:?} with the serial in \
                 the grant's status appeared in time (iscsiadm -m session -P 3 shows what the \
                 sessions hold)",
                connection.iqn
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Mounts the first LUN read-only at `dir` (made when missing; its multipath device when there
/// is one), unless it is mounted there already; another device there is an error.
async fn mount_first(
    luns: &[(u32, Vec<Device>)],
    dir: &Path,
    key: &ObjectKey,
    state_dir: &Path,
    made: &mut Made,
) -> Result<PathBuf, ClientError> {
    let device = (luns.first())
        .and_then(|(_, devices)| devices.first())
        .map(|d| d.multipath.clone().unwrap_or_else(|| d.dev.clone()))
        .ok_or_else(|| ClientError::Refused("no device to mount".to_owned()))?;
    match mounted_device(dir) {
        None => {
            std::fs::create_dir_all(dir)
                .map_err(|e| ClientError::Refused(format!("{}: {e}", dir.display())))?;
            made.mount = Some(dir.to_owned());
            made.write(state_dir, key)?;
            let args = [
                "-o".as_ref(),
                "ro".as_ref(),
                device.as_os_str(),
                dir.as_os_str(),
            ];
            run("mount", &args).await?;
        }
        Some(number) if Some(number) == device_number(&device) => {}
        Some((major, minor)) => {
            return Err(ClientError::Refused(format!(
                "{} has another device mounted ({major}:{minor}); unmount it or choose another \
                 --mount",
                dir.display()
            )));
        }
    }
    Ok(dir.to_owned())
}

/// Undoes what connect did for `key`: unmounts, logs out and removes its records, and only
/// those. Returns false when connect made nothing for it.
pub async fn disconnect(
    iscsiadm: &Iscsiadm,
    state_dir: &Path,
    key: &ObjectKey,
) -> Result<bool, ClientError> {
    let Some(made) = Made::read_existing(state_dir, key)? else {
        return Ok(false);
    };
    if let Some(dir) = &made.mount
        && is_mount_point(dir)
    {
        run("umount", &[dir.as_os_str()]).await?;
    }
    for portal in &made.records {
        let node = Node {
            target: made.target.clone(),
            portal: *portal,
        };
        iscsiadm.logout(&node).await?;
        iscsiadm.delete_record(&node).await?;
    }
    Made::remove(state_dir, key)?;
    Ok(true)
}

/// Whether `dir` is a mount point, from this process's mount table.
fn is_mount_point(dir: &Path) -> bool {
    mounted_device(dir).is_some()
}

/// The device (major, minor) mounted at `dir`, from this process's mount table.
fn mounted_device(dir: &Path) -> Option<(u32, u32)> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let dir = dir.as_os_str().to_string_lossy();
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Field 3 is major:minor, field 5 the mount point (spaces and such escaped as octal); the
    // last mount on a point is the one seen there.
    table
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (number, point) = (fields.get(2)?, fields.get(4)?);
            (unescape_octal(point) == dir).then_some(*number)
        })
        .and_then(|number| {
            let (major, minor) = number.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
}

/// The (major, minor) of a block device.
fn device_number(device: &Path) -> Option<(u32, u32)> {
    let rdev = rustix::fs::stat(device).ok()?.st_rdev;
    Some((rustix::fs::major(rdev), rustix::fs::minor(rdev)))
}

fn unescape_octal(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), ClientError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ClientError::Refused(format!("{program}: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(ClientError::Refused(format!(
        "{program} {}: {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

impl Made {
    /// `<namespace>_<name>.json`: both are DNS names, which hold no `_` and no `/`.
    fn path(dir: &Path, key: &ObjectKey) -> PathBuf {
        dir.join(format!("{}_{}.json", key.namespace, key.name))
    }

    fn read(dir: &Path, key: &ObjectKey) -> Result<Self, ClientError> {
        Ok(Self::read_existing(dir, key)?.unwrap_or_default())
    }

    fn read_existing(dir: &Path, key: &ObjectKey) -> Result<Option<Self>, ClientError> {
        let path = Self::path(dir, key);
        let failed =
            |e: &dyn std::fmt::Display| ClientError::Refused(format!("{}: {e}", path.display()));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| failed(&e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(&e)),
        }
    }

    fn write(&self, dir: &Path, key: &ObjectKey) -> Result<(), ClientError> {
        let path = Self::path(dir, key);
        let failed =
            |e: &dyn std::fmt::Display| ClientError::Refused(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| failed(&e))?;
        crate::fsutil::write_atomic(&path, &json).map_err(|e| failed(&e))
    }

    fn remove(dir: &Path, key: &ObjectKey) -> Result<(), ClientError> {
        let path = Self::path(dir, key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::Refused(format!("{}: {e}", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes() {
        assert_eq!(unescape_octal("/mnt/my\\040disc"), "/mnt/my disc");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert!(is_mount_point(Path::new("/")));
    }

    #[test]
    fn what_connect_made_is_written_down_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ObjectKey::new("lab", "web-1");
        assert_eq!(Made::read_existing(dir.path(), &key).expect("read"), None);
        let made = Made {
            target: "iqn.2026-11.dev.discus:demo".into(),
            records: vec!["10.0.0.11:3260".parse().expect("portal")],
            mount: Some(PathBuf::from("/mnt/disc")),
        };
        made.write(dir.path(), &key).expect("write");
        assert!(dir.path().join("lab_web-1.json").is_file());
        assert_eq!(Made::read(dir.path(), &key).expect("read"), made);
        Made::remove(dir.path(), &key).expect("remove");
        Made::remove(dir.path(), &key).expect("removing twice is fine");
    }
}
