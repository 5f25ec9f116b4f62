//! Status as files: `status/<Kind>/<namespace>/<name>.json`, written when it changes, and the
//! table `discus status` prints from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::api;
use crate::desired::ObjectKey;
use crate::manifests::{self, ObjectId};
use crate::reasons::{ConditionType, Kind, Reason};
use crate::status;
use crate::sync::NodeReport;

use super::folder::Loaded;

/// `status/<Kind>/<namespace>/<name>.json` — only for discus's kinds and for names Kubernetes
/// would accept: a file name never comes from anything else (an invalid manifest's raw name
/// could be `../..`).
fn status_path(dir: &Path, kind: &str, key: &ObjectKey) -> Option<PathBuf> {
    let kind = Kind::parse(kind)?;
    let valid = |name: &str| api::rules::object_name(name).is_ok();
    (valid(&key.namespace) && valid(&key.name)).then(|| {
        dir.join(kind.as_str())
            .join(&key.namespace)
            .join(format!("{}.json", key.name))
    })
}

/// Forgets the files that are gone from `dir` (someone removed them), so they are written again.
pub(super) fn forget_missing(previous: &mut BTreeMap<PathBuf, Value>) {
    previous.retain(|path, _| path.exists());
}

pub(super) fn read_statuses(dir: &Path) -> BTreeMap<PathBuf, Value> {
    let mut statuses = BTreeMap::new();
    let Ok(files) = manifests::collect_files(&[dir.to_owned()]) else {
        return statuses;
    };
    for file in files {
        if let Some(value) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            statuses.insert(file, value);
        }
    }
    statuses
}

fn document(kind: &str, key: &ObjectKey, status: Value) -> Value {
    json!({
        "apiVersion": api::API_VERSION,
        "kind": kind,
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": status,
    })
}

/// Writes every resource's status (atomically, and only when it changed) and removes the files
/// of resources that are gone. Returns what the folder now holds.
///
/// A status is computed again only where something it depends on may have changed: after a
/// change that touched one target, the thousands of others keep theirs without being looked at.
pub(super) fn write_statuses(
    dir: &Path,
    loaded: &Loaded,
    report: &NodeReport,
    previous: BTreeMap<PathBuf, Value>,
    now: Timestamp,
) -> BTreeMap<PathBuf, Value> {
    let mut folder = Folder {
        dir,
        loaded,
        now,
        previous,
        current: BTreeMap::new(),
        computed: Vec::new(),
    };
    let r = &loaded.resources;
    for image in &r.images {
        let key = status::key_of(image);
        folder.put(Kind::DiscImage, key, false, &|old| {
            let entries = status::image_entry(image, report).into_iter().collect();
            json!(status::image_status(
                image,
                entries,
                parsed(old).as_ref(),
                now
            ))
        });
    }
    for target in &r.targets {
        let key = status::key_of(target);
        let untouched = report.untouched_target(&key);
        folder.put(Kind::IscsiTarget, key, untouched, &|old| {
            let entries = status::target_entry(target, report).into_iter().collect();
            let iqn = report.desired.iqns.get(&status::key_of(target)).cloned();
            json!(status::target_status(
                target,
                entries,
                iqn,
                parsed(old).as_ref(),
                now
            ))
        });
    }
    for grant in &r.grants {
        let key = status::key_of(grant);
        let untouched = report.untouched_grant(&key);
        let expired = report.desired.expired.contains(&key);
        folder.put(Kind::InitiatorAccess, key, untouched, &|old| {
            let entries = status::grant_entry(grant, report).into_iter().collect();
            json!(status::grant_status(
                grant,
                entries,
                expired,
                None,
                parsed(old).as_ref(),
                now
            ))
        });
    }
    for (id, errors) in &loaded.invalid {
        folder.put_invalid(id, errors);
    }
    folder.write()
}

fn parsed<T: serde::de::DeserializeOwned>(value: Option<&Value>) -> Option<T> {
    value.and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The status folder while one pass's statuses are computed: what it held, what it will hold.
struct Folder<'a> {
    dir: &'a Path,
    loaded: &'a Loaded,
    now: Timestamp,
    previous: BTreeMap<PathBuf, Value>,
    current: BTreeMap<PathBuf, Value>,
    /// The files whose status was computed again (the rest kept theirs).
    computed: Vec<PathBuf>,
}

impl Folder<'_> {
    /// One resource's status: kept as it is when the pass left it untouched and it was settled,
    /// else computed from the previous one; `Stalled` when its manifest is stale.
    fn put(
        &mut self,
        kind: Kind,
        key: ObjectKey,
        untouched: bool,
        status: &dyn Fn(Option<&Value>) -> Value,
    ) {
        let Some(path) = status_path(self.dir, kind.as_str(), &key) else {
            return;
        };
        let id = ObjectId {
            kind: kind.as_str().to_owned(),
            key,
        };
        let keep = untouched
            && self.previous.get(&path).is_some_and(settled)
            && !self.loaded.changed.contains(&id);
        if keep && let Some(old) = self.previous.remove(&path) {
            self.current.insert(path, old);
            return;
        }
        let before = self.previous.get(&path);
        let mut value = status(before.and_then(|v| v.get("status")));
        if let Some((reason, why)) = self.loaded.stale.get(&id) {
            let since = before
                .and_then(|v| v.pointer("/status/conditions"))
                .and_then(Value::as_array)
                .and_then(|c| {
                    c.iter().find(|c| {
                        c["type"] == ConditionType::Stalled.as_str()
                            && c["reason"] == reason.as_str()
                    })
                })
                .map(|c| c["lastTransitionTime"].clone());
            let since = since.unwrap_or_else(|| json!(self.now.to_string()));
            mark_stale(&mut value, *reason, why, since);
        }
        self.current
            .insert(path.clone(), document(&id.kind, &id.key, value));
        self.computed.push(path);
    }

    /// A manifest that is not even well-formed: not Ready, Stalled, with why.
    fn put_invalid(&mut self, id: &ObjectId, errors: &api::FieldErrors) {
        let Some(path) = status_path(self.dir, &id.kind, &id.key) else {
            tracing::warn!("{id}: {errors}");
            return;
        };
        let previous_conditions: Vec<Condition> = self
            .previous
            .get(&path)
            .and_then(|v| v.pointer("/status/conditions"))
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        let conditions =
            status::invalid_conditions(&previous_conditions, &errors.to_string(), None, self.now);
        self.current.insert(
            path.clone(),
            document(&id.kind, &id.key, json!({ "conditions": conditions })),
        );
        self.computed.push(path);
    }

    /// Writes what changed, removes the files of resources that are gone.
    fn write(mut self) -> BTreeMap<PathBuf, Value> {
        for path in std::mem::take(&mut self.computed) {
            let Some(object) = self.current.get(&path) else {
                continue;
            };
            if self.previous.get(&path) == Some(object) {
                continue;
            }
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    crate::fsutil::write_replace(
                        &path,
                        &serde_json::to_vec_pretty(object).unwrap_or_default(),
                    )
                });
            if let Err(error) = written {
                tracing::warn!(path = %path.display(), %error, "cannot write status");
            }
        }
        for path in self.previous.keys() {
            if !self.current.contains_key(path) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.current
    }
}

/// A resource served as its manifest was last read: `Stalled` says why, until the file reads.
fn mark_stale(status: &mut Value, reason: Reason, why: &str, since: Value) {
    let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) else {
        return;
    };
    let stalled = ConditionType::Stalled.as_str();
    conditions.retain(|c| c["type"] != stalled);
    conditions.push(json!({
        "type": stalled,
        "status": "True",
        "reason": reason.as_str(),
        "message": why,
        "lastTransitionTime": since,
    }));
}

/// Whether every status says Ready.
pub(super) fn all_ready(statuses: &BTreeMap<PathBuf, Value>) -> bool {
    statuses.values().all(is_ready)
}

/// A status document's Ready condition.
fn ready_condition(object: &Value) -> Option<&Value> {
    object
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == ConditionType::Ready.as_str())
}

fn is_ready(object: &Value) -> bool {
    ready_condition(object).is_some_and(|c| c["status"] == "True")
}

/// Ready, and no node says anything is amiss (a boot problem leaves a grant Ready with a reason):
/// a status that can be kept as it is while nothing it depends on changes. One with a reason is
/// computed again, since what it names (another grant's card, say) may have changed elsewhere.
fn settled(object: &Value) -> bool {
    let quiet = |node: &Value| node.get("reason").is_none_or(Value::is_null);
    is_ready(object)
        && (object.pointer("/status/nodes").and_then(Value::as_array))
            .is_none_or(|nodes| nodes.iter().all(quiet))
}

/// `discus status`: every resource's status, as a table.
pub fn status_table(data_dir: &Path) -> String {
    let statuses = read_statuses(&data_dir.join("status"));
    let mut rows = vec![
        ["RESOURCE", "READY", "REASON", "PORTALS", "SESSIONS"]
            .map(String::from)
            .to_vec(),
    ];
    for object in statuses.values() {
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let ready = ready_condition(object).cloned().unwrap_or_default();
        let kind = text("/kind");
        let portals = match Kind::parse(&kind) {
            Some(Kind::IscsiTarget) => object.pointer("/status/portals"),
            Some(Kind::InitiatorAccess) => object.pointer("/status/connection/portals"),
            _ => None,
        }
        .and_then(Value::as_array)
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
        let nodes = object
            .pointer("/status/nodes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let sessions = match Kind::parse(&kind) {
            Some(Kind::IscsiTarget) => nodes
                .iter()
                .filter_map(|n| n["sessions"].as_i64())
                .sum::<i64>()
                .to_string(),
            Some(Kind::InitiatorAccess) => nodes
                .iter()
                .filter_map(|n| n["sessions"].as_array())
                .map(Vec::len)
                .sum::<usize>()
                .to_string(),
            _ => String::new(),
        };
        rows.push(vec![
            format!(
                "{kind}/{}/{}",
                text("/metadata/namespace"),
                text("/metadata/name")
            ),
            ready["status"].as_str().unwrap_or("Unknown").to_owned(),
            ready["reason"].as_str().unwrap_or("").to_owned(),
            portals,
            sessions,
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The messages of every resource that is not Ready, for `discus status` to explain.
pub fn not_ready_messages(data_dir: &Path) -> Vec<String> {
    read_statuses(&data_dir.join("status"))
        .values()
        .filter_map(|object| {
            let ready = ready_condition(object)?;
            (ready["status"] != "True").then(|| {
                format!(
                    "{}/{}/{}: {}",
                    object["kind"].as_str().unwrap_or(""),
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    object
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    ready["message"].as_str().unwrap_or("")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_status_no_node_finds_fault_with_is_kept() {
        let status = |ready: &str, reason: Option<&str>| {
            json!({"status": {
                "conditions": [{"type": "Ready", "status": ready}],
                "nodes": [{"node": "n1", "applied": true}, {"node": "n2", "applied": true, "reason": reason}],
            }})
        };
        assert!(settled(&status("True", None)));
        assert!(!settled(&status("True", Some("DuplicateBootMac"))));
        assert!(!settled(&status("False", None)));
        assert!(settled(
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        ));
    }
}
