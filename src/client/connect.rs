//! `discus connect` and `discus disconnect`: from a grant's status to a block device, and back.
//!
//! connect reads the grant and its CHAP Secret with the client's own credentials, creates an
//! open-iscsi node record for every portal (CHAP written into the record, never on a command
//! line), logs in, and waits for the LUN's block device, found by the unit serial the storage
//! nodes present. What it makes is written down before it is made (`state`), so that disconnect
//! removes exactly that — its mount, its sessions, its records — and nothing another tool made;
//! a connect that fails undoes what it made. Both are idempotent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::devices::{self, Device, Roots, Wanted};
use super::list::readiness;
use super::open_iscsi::{InitiatorError, Iscsiadm, Node};
use super::state::{self, Made};
use super::{ClientError, explain, mount};
use crate::api::InitiatorAccess;
use crate::api::chap::{ChapCredentials, secret_data};
use crate::api::initiator_access::Connection;
use crate::desired::ObjectKey;

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
    /// Where connect writes down what it made.
    pub state_dir: PathBuf,
    /// This machine's initiator name.
    pub initiator: String,
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

/// Connects this machine to the grant `key`: records, logins, devices, and a read-only mount
/// at `mount` when asked. Waits `deadline` at most for the grant to be Ready and the devices.
pub async fn connect(
    machine: &Machine,
    key: &ObjectKey,
    mount: Option<&Path>,
    deadline: Duration,
) -> Result<Connected, ClientError> {
    let started = Instant::now();
    let _claim = state::claim(&machine.state_dir, key)?;
    let grant = ready_grant(machine, key, started + deadline).await?;
    let connection = (grant.status.as_ref())
        .and_then(crate::status::current_connection)
        .ok_or_else(|| ClientError::Api(format!("InitiatorAccess {key} has no connection yet")))?;
    let chap = credentials(machine, key, &grant).await?;
    machine.iscsiadm.check_iscsid().await?;
    let before = Made::read(&machine.state_dir, key)?;
    let mut made = before.clone().unwrap_or_default();
    made.target.clone_from(&connection.iqn);
    let attached = attach(
        machine,
        key,
        &connection,
        chap.as_ref(),
        &mut made,
        started + deadline,
    );
    let mut connected = match attached.await {
        Ok(connected) => connected,
        Err(error) => {
            // A first connect that fails leaves nothing behind; a repeated one, what was there.
            if before.is_none()
                && let Err(undo) = undo(&machine.iscsiadm, &machine.state_dir, key, &made).await
            {
                eprintln!("warning: undoing this connect: {undo}; run discus disconnect");
            }
            return Err(error);
        }
    };
    connected.elapsed = started.elapsed();
    if let Some(dir) = mount {
        connected.mounted = Some(mount_first(&connected.luns, dir, key, machine, &mut made).await?);
    }
    Ok(connected)
}

/// Records, logins and the devices of every LUN.
async fn attach(
    machine: &Machine,
    key: &ObjectKey,
    connection: &Connection,
    chap: Option<&ChapCredentials>,
    made: &mut Made,
    until: Instant,
) -> Result<Connected, ClientError> {
    let nodes = nodes(connection)?;
    let sessions = machine.iscsiadm.sessions().await?;
    for node in &nodes {
        ensure_record(machine, key, node, chap, &sessions, made).await?;
    }
    let paths = login_any(&machine.iscsiadm, &nodes).await?;
    let luns = wait_for_devices(&machine.roots, connection, paths, until).await?;
    Ok(Connected {
        luns,
        mounted: None,
        elapsed: Duration::ZERO,
    })
}

/// The grant once it is Ready, checked to be this machine's.
async fn ready_grant(
    machine: &Machine,
    key: &ObjectKey,
    until: Instant,
) -> Result<InitiatorAccess, ClientError> {
    let api: Api<InitiatorAccess> = Api::namespaced(machine.api.clone(), &key.namespace);
    loop {
        let grant =
            (api.get(&key.name).await).map_err(|e| explain(&e, "get", "InitiatorAccess", key))?;
        if grant.spec.initiator_iqn != machine.initiator {
            return Err(ClientError::Refused(format!(
                "InitiatorAccess {key} is for {}, and this machine is {} (its initiator name; \
                 --initiator-iqn sets another)",
                grant.spec.initiator_iqn, machine.initiator
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
    machine: &Machine,
    key: &ObjectKey,
    grant: &InitiatorAccess,
) -> Result<Option<ChapCredentials>, ClientError> {
    let Some(chap) = &grant.spec.chap else {
        return Ok(None);
    };
    let secret_key = key.sibling(&chap.secret_ref.name);
    let secrets: Api<Secret> = Api::namespaced(machine.api.clone(), &key.namespace);
    let secret = (secrets.get(&secret_key.name).await)
        .map_err(|e| explain(&e, "get", "Secret", &secret_key))?;
    ChapCredentials::from_secret_data(&secret_data(&secret), chap.mutual)
        .map(Some)
        .map_err(|errors| ClientError::Refused(format!("Secret {secret_key}: {errors}")))
}

fn nodes(connection: &Connection) -> Result<Vec<Node>, ClientError> {
    (connection.portals.iter())
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

/// The node record of `node`, made by connect (now, or before), with CHAP as the Secret says
/// now. A record or a session connect did not make is left alone, and connect stops.
async fn ensure_record(
    machine: &Machine,
    key: &ObjectKey,
    node: &Node,
    chap: Option<&ChapCredentials>,
    sessions: &[(String, SocketAddr)],
    made: &mut Made,
) -> Result<(), ClientError> {
    let exists = machine.iscsiadm.has_record(node).await?;
    let ours = made.records.contains(&node.portal);
    let logged_in = sessions.contains(&(node.target.clone(), node.portal));
    if !ours && (exists || logged_in) {
        let what = if exists { "a node record" } else { "a session" };
        return Err(ClientError::Refused(format!(
            "{what} for {} at {} exists that discus connect did not make; remove it \
             (iscsiadm -m node -T {} -p {} --logout, then -o delete) or use it yourself",
            node.target, node.portal, node.target, node.portal
        )));
    }
    if exists {
        // Credentials may have changed since: the record says what the Secret says now.
        return Ok(machine.iscsiadm.set_chap(node, chap)?);
    }
    // Written down first: a connect that dies now leaves nothing disconnect cannot find.
    if !ours {
        made.records.push(node.portal);
        made.write(&machine.state_dir, key)?;
    }
    Ok(machine.iscsiadm.create_record(node, chap).await?)
}

/// Logs in at every portal; one path is enough, the others are said. Returns how many paths
/// logged in.
async fn login_any(iscsiadm: &Iscsiadm, nodes: &[Node]) -> Result<usize, ClientError> {
    let mut refused = Vec::new();
    for node in nodes {
        if let Err(error) = iscsiadm.login(node).await {
            refused.push(error.to_string());
        }
    }
    if refused.len() == nodes.len() {
        return Err(ClientError::Refused(refused.join("; ")));
    }
    let paths = nodes.len() - refused.len();
    for why in refused {
        eprintln!("warning: {why}");
    }
    Ok(paths)
}

/// How long the devices of the other paths may take to show once each LUN has one.
const OTHER_PATHS: Duration = Duration::from_secs(10);

/// The devices of every LUN: one per path logged in, or, once each LUN has one, what the other
/// paths showed within `OTHER_PATHS` (said, when some did not).
async fn wait_for_devices(
    roots: &Roots,
    connection: &Connection,
    paths: usize,
    until: Instant,
) -> Result<Vec<(u32, Vec<Device>)>, ClientError> {
    let mut every_lun_since: Option<Instant> = None;
    loop {
        let found = lun_devices(roots, connection);
        let fewest = found.iter().map(|(_, d)| d.len()).min().unwrap_or(0);
        let now = Instant::now();
        if fewest >= paths {
            return Ok(found);
        }
        if fewest > 0 {
            let since = *every_lun_since.get_or_insert(now);
            if now.duration_since(since) >= OTHER_PATHS || now + POLL > until {
                eprintln!("warning: {fewest} of {paths} paths show the LUNs' devices");
                return Ok(found);
            }
        } else if now + POLL > until {
            let missing: Vec<u32> = (found.iter())
                .filter(|(_, d)| d.is_empty())
                .map(|(lun, _)| *lun)
                .collect();
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

/// Each LUN's devices now: by the serial in status, or by number without one.
fn lun_devices(roots: &Roots, connection: &Connection) -> Vec<(u32, Vec<Device>)> {
    (connection.luns.iter())
        .map(|l| {
            let wanted = match &l.serial {
                Some(serial) => Wanted::Serial(serial),
                None => Wanted::Number(l.device_lun.unwrap_or(l.lun)),
            };
            (l.lun, devices::find(roots, &connection.iqn, wanted))
        })
        .collect()
}

/// Mounts the first LUN read-only at `dir` (its multipath device when there is one), unless it
/// is mounted there already. One mount per grant: another `--mount` is refused.
async fn mount_first(
    luns: &[(u32, Vec<Device>)],
    dir: &Path,
    key: &ObjectKey,
    machine: &Machine,
    made: &mut Made,
) -> Result<PathBuf, ClientError> {
    let device = (luns.first())
        .and_then(|(_, devices)| devices.first())
        .map(|d| d.multipath.clone().unwrap_or_else(|| d.dev.clone()))
        .ok_or_else(|| ClientError::Refused("no device to mount".to_owned()))?;
    let wanted = std::fs::canonicalize(dir).ok();
    if let Some(earlier) = &made.mount
        && Some(&earlier.path) != wanted.as_ref()
        && mount::mounted_device(&earlier.path) == Some(earlier.device)
    {
        return Err(ClientError::Refused(format!(
            "InitiatorAccess {key} is mounted at {} already; discus disconnect first",
            earlier.path.display()
        )));
    }
    let (mounted, already) = mount::prepare(&device, dir)?;
    // Written down first, as the records are.
    made.mount = Some(mounted.clone());
    made.write(&machine.state_dir, key)?;
    if !already {
        mount::read_only(&device, &mounted).await?;
    }
    Ok(mounted.path)
}

/// Undoes what connect did for `key`: unmounts, logs out and removes its records, and only
/// those. Returns false when connect made nothing for it.
pub async fn disconnect(
    iscsiadm: &Iscsiadm,
    state_dir: &Path,
    key: &ObjectKey,
) -> Result<bool, ClientError> {
    let _claim = state::claim(state_dir, key)?;
    let Some(made) = Made::read(state_dir, key)? else {
        return Ok(false);
    };
    undo(iscsiadm, state_dir, key, &made).await?;
    Ok(true)
}

async fn undo(
    iscsiadm: &Iscsiadm,
    state_dir: &Path,
    key: &ObjectKey,
    made: &Made,
) -> Result<(), ClientError> {
    if let Some(mounted) = &made.mount {
        mount::unmount(mounted).await?;
    }
    for portal in &made.records {
        let node = Node {
            target: made.target.clone(),
            portal: *portal,
        };
        iscsiadm.logout(&node).await?;
        iscsiadm.delete_record(&node).await?;
    }
    Made::remove(state_dir, key)
}
