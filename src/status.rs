//! Status: each node's entry for each resource, from a sync report, and the resource's kstatus
//! conditions from the entries of every node.
//!
//! Conditions follow kstatus: `Ready` always; `Reconciling` while work is under way; `Stalled`
//! when only a person can fix it; `Expired` for grants past their time. A condition's
//! `lastTransitionTime` moves only when its status changes, so unchanged status writes nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use crate::api::disc_image::{DiscImageNodeStatus, ImagePhase, NodeEndpointStatus};
use crate::api::initiator_access::{
    AccessNodeStatus, Connection, ConnectionLun, HeartbeatStatus, SessionStatus,
};
use crate::api::iscsi_target::{LunStatus, TargetNodeStatus};
use crate::api::quantity::format_bytes;
use crate::api::{
    DiscImage, DiscImageStatus, InitiatorAccess, InitiatorAccessStatus, IscsiTarget,
    IscsiTargetStatus,
};
use crate::desired::{ObjectKey, Problem, object_key};
use crate::images::manager::ImageState;
use crate::reasons::{ConditionType, Kind, Reason};
use crate::sync::{NodeReport, session_key};

/// One condition as wanted now.
struct Wanted {
    kind: ConditionType,
    status: bool,
    reason: String,
    message: String,
}

/// The conditions, keeping each one's transition time while its status stays the same.
fn conditions(
    previous: &[Condition],
    wanted: Vec<Wanted>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    wanted
        .into_iter()
        .map(|w| {
            let status = if w.status { "True" } else { "False" }.to_owned();
            let since = previous
                .iter()
                .find(|c| c.type_ == w.kind.as_str() && c.status == status)
                .map_or(Time(now), |c| c.last_transition_time.clone());
            Condition {
                type_: w.kind.as_str().to_owned(),
                status,
                reason: w.reason,
                message: w.message,
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Ready, and Reconciling or Stalled when not ready, from a summary.
fn kstatus(ready: bool, reason: &str, message: &str, stalled: bool) -> Vec<Wanted> {
    let reason = reason.to_owned();
    let message = message.to_owned();
    let mut wanted = vec![Wanted {
        kind: ConditionType::Ready,
        status: ready,
        reason: reason.clone(),
        message: message.clone(),
    }];
    if !ready {
        wanted.push(Wanted {
            kind: if stalled {
                ConditionType::Stalled
            } else {
                ConditionType::Reconciling
            },
            status: true,
            reason,
            message,
        });
    }
    wanted
}

fn stalls(reason: Option<&str>) -> bool {
    reason.is_some_and(is_stalling)
}

/// Whether a reason in status is one only a person can resolve (kstatus `Stalled`).
pub fn is_stalling(reason: &str) -> bool {
    Reason::parse(reason).is_some_and(Reason::stalls)
}

/// The first problem's reason and every problem's message.
fn summary(problems: &[&Problem]) -> Option<(String, String)> {
    let first = problems.first()?;
    let message = problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    Some((first.reason.to_string(), message))
}

/// Whether a node's entry describes the spec of `generation`. An entry without a generation was
/// written by an agent older than the field: taken as current, as it was then.
pub fn current(entry_generation: Option<i64>, generation: Option<i64>) -> bool {
    match (entry_generation, generation) {
        (Some(seen), Some(now)) => seen == now,
        _ => true,
    }
}

/// Why an object every node serves is not Ready yet: `node` has not applied its latest spec.
fn catching_up(node: &str, generation: Option<i64>) -> (String, String, bool) {
    let message = format!(
        "{node}: has not applied generation {} yet",
        generation.unwrap_or_default()
    );
    (Reason::NotConverged.to_string(), message, false)
}

// --- DiscImage ------------------------------------------------------------------------------

/// This node's entry for an image: its phase here, or nothing when the node does not need it.
pub fn image_entry(image: &DiscImage, report: &NodeReport) -> Option<DiscImageNodeStatus> {
    let key = object_key(image.meta());
    let problems: Vec<&Problem> = report.problems_of(Kind::DiscImage, &key).collect();
    let mut entry = DiscImageNodeStatus {
        node: report.node.clone(),
        observed_generation: report.generation(Kind::DiscImage, image.meta())?,
        ..DiscImageNodeStatus::default()
    };
    if let Some((reason, message)) = summary(&problems) {
        entry.phase = ImagePhase::Failed;
        entry.reason = Some(reason);
        entry.message = Some(message);
        return Some(entry);
    }
    match report.images.get(&key)? {
        ImageState::Ready(stored) => {
            entry.phase = ImagePhase::Ready;
            entry.bytes_done = i64::try_from(stored.virtual_size).ok();
            entry.bytes_total = entry.bytes_done;
            entry.format =
                serde_json::from_value(serde_json::Value::String(stored.format.clone())).ok();
            entry.virtual_size = Some(format_bytes(stored.virtual_size));
            entry.served_sha256 = Some(stored.served_sha256.clone());
            if report.offered.contains(&key) {
                entry.peer = endpoint_at(report, &crate::images::peers::path(&stored.sha256));
            }
        }
        ImageState::InProgress(progress) => {
            entry.phase = progress.phase;
            entry.bytes_done = i64::try_from(progress.bytes_done).ok();
            entry.bytes_total = progress.bytes_total.and_then(|t| i64::try_from(t).ok());
            if progress.phase == ImagePhase::Uploading {
                let uid = image.meta().uid.as_deref();
                entry.upload =
                    uid.and_then(|uid| endpoint_at(report, &crate::upload::endpoint::path(uid)));
            }
        }
        ImageState::Failed { message, .. } => {
            entry.phase = ImagePhase::Failed;
            entry.message = Some(message.clone());
        }
    }
    Some(entry)
}

/// `path` on this node's upload endpoint, if it has one.
fn endpoint_at(report: &NodeReport, path: &str) -> Option<NodeEndpointStatus> {
    let endpoint = report.upload.as_ref()?;
    Some(NodeEndpointStatus {
        urls: endpoint
            .urls
            .iter()
            .map(|url| format!("{url}{path}"))
            .collect(),
        certificate_sha256: endpoint.certificate_sha256.clone(),
    })
}

/// An image's whole status from every node's entry.
pub fn image_status(
    image: &DiscImage,
    entries: Vec<DiscImageNodeStatus>,
    previous: Option<&DiscImageStatus>,
    now: Timestamp,
) -> DiscImageStatus {
    let generation = image.meta().generation;
    let is_current = |e: &&DiscImageNodeStatus| current(e.observed_generation, generation);
    let stored = (entries.iter().filter(is_current)).find(|e| e.phase == ImagePhase::Ready);
    let served = !entries.is_empty() && entries.iter().all(|e| e.phase == ImagePhase::Ready);
    let behind = entries.iter().find(|e| !is_current(e));
    let ready = served && behind.is_none();
    let failed = entries.iter().find(|e| e.phase == ImagePhase::Failed);
    let (reason, message, stalled) = if ready {
        (
            Reason::Ready.to_string(),
            format!("verified and stored on {} node(s)", entries.len()),
            false,
        )
    } else if let (true, Some(entry)) = (served, behind) {
        catching_up(&entry.node, generation)
    } else if let Some(failed) = failed {
        let reason = failed
            .reason
            .clone()
            .unwrap_or_else(|| Reason::ImportFailed.to_string());
        let stalled = stalls(Some(&reason));
        (reason, failed.message.clone().unwrap_or_default(), stalled)
    } else if let Some(entry) = entries.first() {
        let phase = format!("{:?}", entry.phase);
        let progress = match (entry.bytes_done, entry.bytes_total) {
            (Some(done), Some(total)) => {
                format!("{phase} on {}: {done} of {total} bytes", entry.node)
            }
            _ => format!("{phase} on {}", entry.node),
        };
        (phase, progress, false)
    } else {
        (
            Reason::NotNeeded.to_string(),
            "no node needs this image yet".to_owned(),
            false,
        )
    };
    DiscImageStatus {
        observed_generation: generation,
        conditions: conditions(
            previous.map_or(&[][..], |p| &p.conditions),
            kstatus(ready, &reason, &message, stalled),
            generation,
            now,
        ),
        format: stored.and_then(|s| s.format),
        virtual_size: stored.and_then(|s| s.virtual_size.clone()),
        sha256: stored.map(|_| image.spec.sha256.clone()),
        served_sha256: stored.and_then(|s| s.served_sha256.clone()),
        nodes: entries,
    }
}

// --- IscsiTarget ----------------------------------------------------------------------------

/// This node's entry for a target, or nothing when it is not placed here.
pub fn target_entry(target: &IscsiTarget, report: &NodeReport) -> Option<TargetNodeStatus> {
    let key = object_key(target.meta());
    let problems: Vec<&Problem> = report.problems_of(Kind::IscsiTarget, &key).collect();
    let served = report.served_target(&key);
    let mut entry = TargetNodeStatus {
        node: report.node.clone(),
        observed_generation: report.generation(Kind::IscsiTarget, target.meta())?,
        ..TargetNodeStatus::default()
    };
    if let Some((reason, message)) = summary(&problems) {
        entry.reason = Some(reason);
        entry.message = Some(message);
        return Some(entry);
    }
    let served = served?;
    entry.portals = served.portals.iter().map(ToString::to_string).collect();
    entry.luns = served
        .luns
        .iter()
        .map(|l| LunStatus {
            lun: l.lun,
            device_lun: report.device_lun(l.lun),
            serial: l.serial.clone(),
            size: format_bytes(l.size_bytes),
        })
        .collect();
    entry.sessions = report.sessions_on(&served.iqn).count() as i32;
    let unsettled = report.unsettled_messages(&served.iqn, None);
    if unsettled.is_empty() {
        entry.ready = true;
    } else {
        entry.reason = Some(Reason::NotConverged.to_string());
        entry.message = Some(unsettled.join("; "));
    }
    Some(entry)
}

/// A target's whole status from every node's entry; `iqn` is the IQN it is served under.
pub fn target_status(
    target: &IscsiTarget,
    entries: Vec<TargetNodeStatus>,
    iqn: Option<String>,
    previous: Option<&IscsiTargetStatus>,
    now: Timestamp,
) -> IscsiTargetStatus {
    let generation = target.meta().generation;
    let ready_count = entries.iter().filter(|e| e.ready).count();
    let served = !entries.is_empty() && ready_count == entries.len();
    let behind = (entries.iter()).find(|e| !current(e.observed_generation, generation));
    let ready = served && behind.is_none();
    let (reason, message, stalled) = if ready {
        (
            Reason::Ready.to_string(),
            format!("served by {ready_count} node(s)"),
            false,
        )
    } else if let (true, Some(entry)) = (served, behind) {
        catching_up(&entry.node, generation)
    } else if let Some(entry) = entries.iter().find(|e| !e.ready) {
        let reason = entry
            .reason
            .clone()
            .unwrap_or_else(|| Reason::NotConverged.to_string());
        let message = format!(
            "{}: {}",
            entry.node,
            entry.message.clone().unwrap_or_default()
        );
        (reason, message, stalls(entry.reason.as_deref()))
    } else {
        (
            Reason::NoNode.to_string(),
            "no storage node matches spec.nodeSelector".to_owned(),
            false,
        )
    };
    let mut portals: Vec<String> = entries
        .iter()
        .flat_map(|e| e.portals.iter().cloned())
        .collect();
    portals.sort();
    portals.dedup();
    IscsiTargetStatus {
        observed_generation: generation,
        conditions: conditions(
            previous.map_or(&[][..], |p| &p.conditions),
            kstatus(ready, &reason, &message, stalled),
            generation,
            now,
        ),
        iqn,
        portals,
        lun_count: i32::try_from(target.spec.luns.len()).ok(),
        ready_nodes: Some(format!("{ready_count}/{}", entries.len())),
        nodes: entries,
    }
}

// --- InitiatorAccess ------------------------------------------------------------------------

/// This node's entry for a grant, or nothing when its target is not placed here.
pub fn grant_entry(grant: &InitiatorAccess, report: &NodeReport) -> Option<AccessNodeStatus> {
    let key = object_key(grant.meta());
    // Boot problems withhold the boot script, not the access: said, but not in the way.
    let (boot, problems): (Vec<&Problem>, Vec<&Problem>) = report
        .problems_of(Kind::InitiatorAccess, &key)
        .partition(|p| p.reason.is_boot());
    let mut entry = AccessNodeStatus {
        node: report.node.clone(),
        observed_generation: report.generation(Kind::InitiatorAccess, grant.meta())?,
        ..AccessNodeStatus::default()
    };
    if report.desired.expired.contains(&key) {
        entry.reason = Some(Reason::Expired.to_string());
        entry.message = Some(format!(
            "expired at {}",
            grant.spec.expires_at.clone().unwrap_or_default()
        ));
        return Some(entry);
    }
    if let Some((reason, message)) = summary(&problems) {
        entry.reason = Some(reason);
        entry.message = Some(message);
        return Some(entry);
    }
    let (target, acl) = report.grant_acl(&key)?;
    let initiator = grant.spec.initiator_iqn.as_str();
    entry.sessions = report
        .sessions_on(&target.iqn)
        .filter(|s| s.initiator == initiator)
        .map(|s| {
            let since = report.session_since.get(&session_key(s));
            SessionStatus {
                address: s.address.clone().unwrap_or_default(),
                since: since.map(ToString::to_string),
            }
        })
        .collect();
    let unsettled = report.unsettled_messages(&target.iqn, Some(initiator));
    if unsettled.is_empty() {
        entry.applied = true;
        entry.connection = Some(Connection {
            iqn: target.iqn.clone(),
            portals: target.portals.iter().map(ToString::to_string).collect(),
            luns: acl
                .luns
                .iter()
                .map(|m| ConnectionLun {
                    lun: m.lun,
                    device_lun: report.device_lun(m.lun),
                    read_only: m.read_only,
                    serial: (target.luns.iter())
                        .find(|l| l.lun == m.lun)
                        .map(|l| l.serial.clone()),
                })
                .collect(),
            // Where its machines get their script: only where the boot table has the grant.
            boot_urls: if report.booting.contains(&key) {
                report.boot_urls.clone()
            } else {
                Vec::new()
            },
        });
        if let Some((reason, message)) = summary(&boot) {
            entry.reason = Some(reason);
            entry.message = Some(message);
        }
    } else {
        entry.reason = Some(Reason::NotConverged.to_string());
        entry.message = Some(unsettled.join("; "));
    }
    Some(entry)
}

/// A grant's whole status from every node's entry; `expired` says whether it is past its time,
/// `heartbeat` what the lease holder saw of a held grant's Lease.
pub fn grant_status(
    grant: &InitiatorAccess,
    entries: Vec<AccessNodeStatus>,
    expired: bool,
    heartbeat: Option<HeartbeatStatus>,
    previous: Option<&InitiatorAccessStatus>,
    now: Timestamp,
) -> InitiatorAccessStatus {
    let generation = grant.meta().generation;
    let applied = entries.iter().filter(|e| e.applied).count();
    let served = !expired && !entries.is_empty() && applied == entries.len();
    let behind = (entries.iter()).find(|e| !current(e.observed_generation, generation));
    let ready = served && behind.is_none();
    let (reason, message, stalled) = if expired {
        (
            Reason::Expired.to_string(),
            format!(
                "expired at {}",
                grant.spec.expires_at.clone().unwrap_or_default()
            ),
            false,
        )
    } else if ready {
        (
            Reason::Ready.to_string(),
            format!("applied on {applied} node(s)"),
            false,
        )
    } else if let (true, Some(entry)) = (served, behind) {
        catching_up(&entry.node, generation)
    } else if let Some(entry) = entries.iter().find(|e| !e.applied) {
        let reason = entry
            .reason
            .clone()
            .unwrap_or_else(|| Reason::NotConverged.to_string());
        let message = format!(
            "{}: {}",
            entry.node,
            entry.message.clone().unwrap_or_default()
        );
        (reason, message, stalls(entry.reason.as_deref()))
    } else {
        (
            Reason::TargetNotServed.to_string(),
            format!(
                "IscsiTarget {} is not served on any node",
                grant.spec.target_ref.name
            ),
            false,
        )
    };
    let mut wanted = kstatus(ready, &reason, &message, stalled);
    // A held grant whose holder is silent rests, as its holder wants: not in progress.
    if reason == Reason::HeartbeatLapsed.as_str() {
        wanted.truncate(1);
    }
    if expired {
        // An expired grant is finished, not in progress: only Ready and Expired.
        wanted.truncate(1);
        wanted.push(Wanted {
            kind: ConditionType::Expired,
            status: true,
            reason: Reason::Expired.to_string(),
            message,
        });
    }
    // Kept while a node applies a change: until it has, its entry says how to connect there.
    let connection = served.then(|| merge_connections(&entries)).flatten();
    InitiatorAccessStatus {
        observed_generation: generation,
        conditions: conditions(
            previous.map_or(&[][..], |p| &p.conditions),
            wanted,
            generation,
            now,
        ),
        connection,
        heartbeat,
        nodes: entries,
    }
}

/// One connection from every node's: the same target and LUNs, every node's portals.
fn merge_connections(entries: &[AccessNodeStatus]) -> Option<Connection> {
    let mut connections = entries.iter().filter_map(|e| e.connection.as_ref());
    let mut merged = connections.next()?.clone();
    add_paths(&mut merged, connections);
    Some(merged)
}

/// A grant's connection as it stands now: the lease holder's, with the portals of every node
/// whose own entry says it applied the grant to the same target — the lease holder adds a
/// node's a moment after that entry (a Ready's details are coalesced). None until the lease
/// holder wrote one.
pub fn current_connection(status: &InitiatorAccessStatus) -> Option<Connection> {
    let mut merged = status.connection.clone()?;
    let applied = (status.nodes.iter().filter(|e| e.applied)).filter_map(|e| e.connection.as_ref());
    let same_target: Vec<&Connection> = applied.filter(|c| c.iqn == merged.iqn).collect();
    add_paths(&mut merged, same_target);
    Some(merged)
}

/// Adds the portals and boot URLs of `others` to `merged`, each once.
fn add_paths<'a>(merged: &mut Connection, others: impl IntoIterator<Item = &'a Connection>) {
    for other in others {
        merged.portals.extend(other.portals.iter().cloned());
        merged.boot_urls.extend(other.boot_urls.iter().cloned());
    }
    merged.portals.sort();
    merged.portals.dedup();
    merged.boot_urls.sort();
    merged.boot_urls.dedup();
}

/// The conditions of an object that is not even well-formed: not Ready, Stalled, with why.
pub fn invalid_conditions(
    previous: &[Condition],
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let reason = Reason::InvalidSpec.to_string();
    conditions(
        previous,
        kstatus(false, &reason, message, true),
        generation,
        now,
    )
}

/// Whether a status says Ready.
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == ConditionType::Ready.as_str() && c.status == "True")
}

/// The key of the resource a status belongs to, for callers that index statuses.
pub fn key_of<K: Resource>(resource: &K) -> ObjectKey {
    object_key(resource.meta())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: &str, applied: bool, iqn: &str, portal: &str) -> AccessNodeStatus {
        AccessNodeStatus {
            node: node.into(),
            applied,
            connection: Some(Connection {
                iqn: iqn.into(),
                portals: vec![portal.into()],
                ..Connection::default()
            }),
            ..AccessNodeStatus::default()
        }
    }

    #[test]
    fn a_connection_now_has_every_applied_node_s_portal_of_the_same_target_only() {
        const IQN: &str = "iqn.2026-11.dev.discus:lab";
        let status = InitiatorAccessStatus {
            connection: merge_connections(&[entry("a", true, IQN, "10.0.0.1:3260")]),
            nodes: vec![
                entry("a", true, IQN, "10.0.0.1:3260"),
                // Applied since the lease holder wrote its connection.
                entry("b", true, IQN, "10.0.0.2:3260"),
                entry("c", false, IQN, "10.0.0.3:3260"),
                entry("d", true, "iqn.2026-11.dev.discus:other", "10.0.0.4:3260"),
            ],
            ..InitiatorAccessStatus::default()
        };
        let now = current_connection(&status).expect("a connection");
        assert_eq!(now.iqn, IQN);
        assert_eq!(now.portals, ["10.0.0.1:3260", "10.0.0.2:3260"]);
        let none = InitiatorAccessStatus {
            connection: None,
            ..status
        };
        assert_eq!(
            current_connection(&none),
            None,
            "not before the lease holder's"
        );
    }

    #[test]
    fn a_pass_that_read_another_object_of_the_name_describes_nothing() {
        let grant = |uid: &str| -> InitiatorAccess {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discus.dev/v1alpha1", "kind": "InitiatorAccess",
                "metadata": {"name": "build01", "namespace": "lab", "uid": uid, "generation": 1},
                "spec": {"targetRef": {"name": "lab"}, "initiatorIqn": "iqn.2010-04.org.ipxe:build01"},
            }))
            .expect("an InitiatorAccess")
        };
        let mut report = NodeReport::new("node-a", "tgt");
        let read = crate::sync::ObjectRead {
            uid: Some("before".into()),
            generation: Some(3),
        };
        let key = key_of(&grant("before"));
        report
            .read
            .insert((Kind::InitiatorAccess, key.clone()), read);
        // Some entry for it: expired, here.
        report.desired.expired.push(key);
        assert!(grant_entry(&grant("before"), &report).is_some());
        // Deleted and made again since the pass: its entry waits for a pass that read it.
        assert_eq!(grant_entry(&grant("again"), &report), None);
    }

    #[test]
    fn ready_waits_until_every_node_applied_the_latest_spec() {
        const IQN: &str = "iqn.2026-11.dev.discus:lab";
        let grant: InitiatorAccess = serde_json::from_value(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "InitiatorAccess",
            "metadata": {"name": "build01", "namespace": "lab", "generation": 2},
            "spec": {"targetRef": {"name": "lab"}, "initiatorIqn": "iqn.2010-04.org.ipxe:build01"},
        }))
        .expect("an InitiatorAccess");
        let at = |node, generation| AccessNodeStatus {
            observed_generation: generation,
            ..entry(node, true, IQN, "10.0.0.1:3260")
        };
        let status = |behind| {
            let entries = vec![at("a", Some(2)), at("b", behind)];
            grant_status(&grant, entries, false, None, None, Timestamp::now())
        };
        let waiting = status(Some(1));
        assert!(!is_ready(&waiting.conditions));
        let ready = &waiting.conditions[0];
        assert_eq!(ready.reason, Reason::NotConverged.as_str());
        assert_eq!(ready.message, "b: has not applied generation 2 yet");
        assert_eq!(waiting.observed_generation, Some(2));
        assert!(
            waiting.connection.is_some(),
            "how to connect stays meanwhile"
        );
        assert!(is_ready(&status(Some(2)).conditions));
        // Written by an agent older than the field: taken as it was then.
        assert!(is_ready(&status(None).conditions));
    }
}
