//! Node reports: how each node tells the lease holder what it made of every object — its
//! entries — in a few ConfigMaps of its own in the agents' namespace, rather than in a status
//! write to each object. On a cold start of 3001 objects, three nodes wrote some 9000 status
//! patches of their entries, each decoded and merged into the whole object by the apiserver,
//! which on two cores made the user's own `kubectl apply` several times slower; a shard of about
//! a hundred entries costs the apiserver about what one such patch did. The lease holder merges
//! the reports into each object's `status.nodes`, with the conditions, in one write per object.
//!
//! A node's entries are spread over `shard_count` ConfigMaps by a hash of the object, so that a
//! change of one object rewrites one shard; the count is in each name, and each shard says
//! since when its node writes that set (`set`). A node whose count changes writes the whole new
//! set before it deletes the old, and the lease holder reads of each node its newest complete
//! set — never a set only partly written — so a node's entries never seem to vanish while it
//! changes sets. Only the node writes its reports; the lease holder deletes those of a node
//! that is gone. A report names its node, and its name must be the one that node's reports
//! have: one that does not fit is not read.
//!
//! Each agent's store holds its own node's reports only; the lease holder watches every node's
//! while it holds the lease (`AllReports`), keeping them parsed rather than as text.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::desired::{Kind, ObjectKey};

use super::StatusBody;
use super::connection::ApiTimeouts;
use super::heartbeat::node_hash;
use super::watch_backoff::watch_backoff;

/// The label of every report; its value is the node's name hashed (see `heartbeat`).
pub const REPORT_LABEL: &str = "discus.dev/report";
/// About this many entries per shard (at most a few times as many, by chance): a shard of 128
/// grant entries with a session each is some 40 KiB, far below a ConfigMap's 1 MiB.
const ENTRIES_PER_SHARD: usize = 128;
/// A shard whose entries come to more (targets of hundreds of LUNs each) makes the count grow.
pub const SHARD_BYTES_AT_MOST: usize = 512 * 1024;
/// The most shards a node writes.
pub const SHARDS_AT_MOST: u32 = 1 << 16;
/// The data keys of a report.
const NODE_KEY: &str = "node";
const SET_KEY: &str = "set";
const ENTRIES_KEY: &str = "entries";

/// How many shards a node with `entries` entries spreads them over, writing `current` now: a
/// power of two, so that the count changes seldom as objects come and go, and it shrinks only
/// once the shards are a quarter full (else 128 entries and 129 would change the set each time).
pub fn shard_count(entries: usize, current: Option<u32>) -> u32 {
    let needed = entries
        .div_ceil(ENTRIES_PER_SHARD)
        .max(1)
        .next_power_of_two();
    let needed = u32::try_from(needed)
        .unwrap_or(SHARDS_AT_MOST)
        .min(SHARDS_AT_MOST);
    match current {
        Some(current) if current > needed && entries * 4 > current as usize * ENTRIES_PER_SHARD => {
            current
        }
        _ => needed,
    }
}

/// The shard of `count` that holds an object's entry.
pub fn shard_of(kind: Kind, key: &ObjectKey, count: u32) -> u32 {
    let mut hash = Sha256::new();
    for part in [kind.as_str(), &key.namespace, &key.name] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let value = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    value % count.max(1)
}

/// Where a shard lives: a name only the node's own reports have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardName {
    pub shard: u32,
    pub count: u32,
}

impl ShardName {
    pub fn of(kind: Kind, key: &ObjectKey, count: u32) -> Self {
        Self {
            shard: shard_of(kind, key, count),
            count,
        }
    }

    /// The ConfigMap's name for `node`.
    pub fn config_map(&self, node: &str) -> String {
        format!("{}{}-of-{}", name_prefix(node), self.shard + 1, self.count)
    }

    /// The shard a ConfigMap of `node` holds, when its name is one of that node's.
    fn parse(node: &str, name: &str) -> Option<Self> {
        let (shard, count) = name.strip_prefix(&name_prefix(node))?.split_once("-of-")?;
        let (shard, count): (u32, u32) = (shard.parse().ok()?, count.parse().ok()?);
        let named = Self {
            shard: shard.checked_sub(1)?,
            count,
        };
        (named.shard < count && named.config_map(node) == name).then_some(named)
    }
}

fn name_prefix(node: &str) -> String {
    format!("discus-report-{}-", node_hash(node))
}

/// One object's entry in a report: the object by uid, so that an entry about an object deleted
/// and made again under the same name is not taken for the new one's.
#[derive(Clone, Debug)]
pub struct Reported {
    pub uid: String,
    pub entry: StatusBody,
}

impl PartialEq for Reported {
    fn eq(&self, other: &Self) -> bool {
        self.uid == other.uid && self.entry.get() == other.entry.get()
    }
}

pub type Records = BTreeMap<(Kind, ObjectKey), Reported>;

#[derive(Serialize)]
struct RecordOut<'a> {
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
    entry: &'a RawValue,
}

#[derive(Deserialize)]
struct RecordIn {
    kind: String,
    namespace: String,
    name: String,
    uid: String,
    entry: Box<RawValue>,
}

/// A report as the ConfigMap's data: the node, since when it writes this set, and its entries in
/// the order of their objects.
pub fn data<'a>(
    node: &str,
    set: Timestamp,
    records: impl IntoIterator<Item = (&'a (Kind, ObjectKey), &'a Reported)>,
) -> serde_json::Result<BTreeMap<String, String>> {
    let out: Vec<RecordOut<'_>> = records
        .into_iter()
        .map(|((kind, key), reported)| RecordOut {
            kind: kind.as_str(),
            namespace: &key.namespace,
            name: &key.name,
            uid: &reported.uid,
            entry: &reported.entry,
        })
        .collect();
    Ok(BTreeMap::from([
        (NODE_KEY.to_owned(), node.to_owned()),
        (SET_KEY.to_owned(), set.to_string()),
        (ENTRIES_KEY.to_owned(), serde_json::to_string(&out)?),
    ]))
}

/// A report read back.
#[derive(Debug)]
pub struct Report {
    pub node: String,
    pub name: ShardName,
    /// Since when the node writes the set this shard belongs to.
    pub set: Timestamp,
    pub records: Records,
}

/// Reads a report; why not when it is not one (no node or set, a name that is not that node's,
/// entries that do not decode). A record of a kind this version does not know, or of an object
/// that belongs in another shard, is left out.
pub fn read(config_map: &ConfigMap) -> Result<Report, String> {
    let data = config_map.data.as_ref();
    let field = |key: &str| data.and_then(|d| d.get(key)).map(String::as_str);
    let node = field(NODE_KEY).ok_or("it names no node")?;
    let name = ShardName::parse(node, &config_map.name_any())
        .ok_or_else(|| format!("its name is not one of node {node}'s reports"))?;
    let set = (field(SET_KEY).ok_or("it names no set")?.parse())
        .map_err(|error| format!("its set is not a time: {error}"))?;
    let listed: Vec<RecordIn> = serde_json::from_str(field(ENTRIES_KEY).unwrap_or("[]"))
        .map_err(|error| format!("its entries do not decode: {error}"))?;
    let mut records = Records::new();
    for record in listed {
        let Some(kind) = Kind::parse(&record.kind) else {
            continue;
        };
        let key = ObjectKey::new(record.namespace, record.name);
        if ShardName::of(kind, &key, name.count) != name {
            continue;
        }
        let reported = Reported {
            uid: record.uid,
            entry: record.entry,
        };
        records.insert((kind, key), reported);
    }
    Ok(Report {
        node: node.to_owned(),
        name,
        set,
        records,
    })
}

/// Every node's reports, as the lease holder watches them: parsed, by ConfigMap name, with when
/// each was made (`None`: not a report, said once in the log). The watch ends when this is
/// dropped.
pub struct AllReports {
    read: Arc<Mutex<HashMap<String, Read>>>,
    listed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

struct Read {
    report: Option<Arc<Report>>,
}

impl Drop for AllReports {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AllReports {
    /// Starts watching the reports in `namespace`; each change wakes `changed`.
    pub fn watch(
        client: Client,
        namespace: &str,
        timeouts: &ApiTimeouts,
        changed: Arc<Notify>,
    ) -> Self {
        let read = Arc::default();
        let listed = Arc::default();
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let stream = watcher(api, timeouts.watcher().labels(REPORT_LABEL)).backoff(watch_backoff());
        let task = tokio::spawn(follow(
            stream,
            Arc::clone(&read),
            Arc::clone(&listed),
            changed,
        ));
        Self { read, listed, task }
    }

    /// Whether the watch has listed once: before that, no node seems to report.
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    /// Of each node, the reports of its newest complete set (see `newest_sets`).
    pub fn newest(&self) -> Vec<Arc<Report>> {
        let read = self.read.lock();
        newest_sets(read.values().filter_map(|r| r.report.clone()))
    }

    /// Every node with a report, whole set or not (a node gone has its reports deleted
    /// whatever they are).
    pub fn nodes(&self) -> std::collections::BTreeSet<String> {
        let read = self.read.lock();
        (read.values())
            .filter_map(|r| Some(r.report.as_ref()?.node.clone()))
            .collect()
    }

    /// The ConfigMap names of the reports of `nodes`.
    pub fn names_of(&self, nodes: &[String]) -> Vec<(String, String)> {
        let read = self.read.lock();
        (read.iter())
            .filter_map(|(name, r)| Some((name.clone(), r.report.as_ref()?.node.clone())))
            .filter(|(_, node)| nodes.contains(node))
            .collect()
    }
}

/// Keeps `read` in line with the watch's events.
async fn follow(
    stream: impl futures::Stream<Item = watcher::Result<watcher::Event<ConfigMap>>>,
    read: Arc<Mutex<HashMap<String, Read>>>,
    listed: Arc<AtomicBool>,
    changed: Arc<Notify>,
) {
    let mut stream = std::pin::pin!(stream);
    // The names a list (again) showed: the others are gone once it is done.
    let mut relisted: HashSet<String> = HashSet::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(config_map)) => take(&read, &config_map),
            Ok(watcher::Event::InitApply(config_map)) => {
                relisted.insert(config_map.name_any());
                take(&read, &config_map);
            }
            Ok(watcher::Event::Delete(config_map)) => {
                read.lock().remove(&config_map.name_any());
            }
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitDone) => {
                read.lock().retain(|name, _| relisted.contains(name));
                listed.store(true, Ordering::Release);
            }
            Err(error) => {
                tracing::warn!(%error, "watch of the nodes' reports failed; retrying");
                continue;
            }
        }
        changed.notify_one();
    }
}

fn take(read: &Mutex<HashMap<String, Read>>, config_map: &ConfigMap) {
    let name = config_map.name_any();
    let report = (self::read(config_map))
        .inspect_err(|error| tracing::warn!(report = %name, %error, "a ConfigMap labelled as a node report is not one; it is left out"))
        .ok()
        .map(Arc::new);
    read.lock().insert(name, Read { report });
}

/// Of each node, its newest complete set of reports: every shard of its count, all of the same
/// set. A node with none complete (while it writes its first) has no reports yet.
pub fn newest_sets(reports: impl IntoIterator<Item = Arc<Report>>) -> Vec<Arc<Report>> {
    let mut sets: BTreeMap<(String, Timestamp, u32), Vec<Arc<Report>>> = BTreeMap::new();
    for report in reports {
        let set = (report.node.clone(), report.set, report.name.count);
        sets.entry(set).or_default().push(report);
    }
    let mut newest: BTreeMap<String, Vec<Arc<Report>>> = BTreeMap::new();
    // In order of node, then set: each node's last complete set wins.
    for ((node, _, count), set) in sets {
        let shards: HashSet<u32> = set.iter().map(|r| r.name.shard).collect();
        if shards.len() == count as usize {
            newest.insert(node, set);
        }
    }
    newest.into_values().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shard `shard` of `count` of node `node`'s set `set`, with no entries.
    fn shard(node: &str, set: i64, shard: u32, count: u32) -> Arc<Report> {
        Arc::new(Report {
            node: node.to_owned(),
            name: ShardName { shard, count },
            set: Timestamp::from_second(set).expect("a time"),
            records: Records::new(),
        })
    }

    #[test]
    fn the_lease_holder_reads_of_each_node_its_newest_complete_set() {
        let chosen = |reports: Vec<Arc<Report>>| {
            let mut chosen: Vec<(String, i64, u32)> = (newest_sets(reports).iter())
                .map(|r| (r.node.clone(), r.set.as_second(), r.name.count))
                .collect();
            chosen.sort();
            chosen.dedup();
            chosen
        };
        let old = || vec![shard("a", 1, 0, 1)];
        // Node a goes from one shard to two: until both are written, the old set.
        let mut growing = old();
        growing.push(shard("a", 2, 0, 2));
        assert_eq!(chosen(growing.clone()), [("a".to_owned(), 1, 1)]);
        growing.push(shard("a", 2, 1, 2));
        assert_eq!(chosen(growing), [("a".to_owned(), 2, 2)]);
        // Back to one shard, rewritten as a new set while the set of two lingers.
        let back = vec![
            shard("a", 2, 0, 2),
            shard("a", 2, 1, 2),
            shard("a", 3, 0, 1),
        ];
        assert_eq!(chosen(back), [("a".to_owned(), 3, 1)]);
        // A node whose first set is not complete has no reports yet.
        assert_eq!(chosen(vec![shard("b", 1, 0, 2)]), []);
    }

    fn config_map(name: &str, data: BTreeMap<String, String>) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }

    #[test]
    fn a_report_reads_back_as_written_and_only_under_its_node_s_name() {
        let key = ObjectKey::new("lab", "t");
        let entry =
            serde_json::value::to_raw_value(&serde_json::json!({"node": "a", "ready": true}))
                .expect("an entry");
        let records = Records::from([(
            (Kind::IscsiTarget, key.clone()),
            Reported {
                uid: "u1".to_owned(),
                entry,
            },
        )]);
        let count = shard_count(records.len(), None);
        let name = ShardName::of(Kind::IscsiTarget, &key, count);
        let set = Timestamp::now();
        let data = data("a", set, &records).expect("data");
        let report = read(&config_map(&name.config_map("a"), data.clone())).expect("read");
        assert_eq!(
            (report.node.as_str(), &report.name, report.set),
            ("a", &name, set)
        );
        assert_eq!(report.records, records);
        // The same data under another node's name (or a made-up one) is not node a's report.
        for name in [name.config_map("b"), "discus-report-x-1-of-1".to_owned()] {
            assert!(read(&config_map(&name, data.clone())).is_err(), "{name}");
        }
    }

    #[test]
    fn shards_grow_by_powers_of_two_and_every_object_has_one() {
        assert_eq!(shard_count(0, None), 1);
        assert_eq!(shard_count(128, None), 1);
        assert_eq!(shard_count(129, None), 2);
        assert_eq!(shard_count(3001, None), 32);
        // Shrinking waits until the shards are a quarter full.
        assert_eq!(shard_count(128, Some(2)), 2);
        assert_eq!(shard_count(64, Some(2)), 1);
        assert_eq!(shard_count(3001, Some(16)), 32);
        let count = shard_count(3001, None);
        let mut used = std::collections::BTreeSet::new();
        for n in 0..3001 {
            let shard = shard_of(
                Kind::InitiatorAccess,
                &ObjectKey::new("lab", format!("g{n}")),
                count,
            );
            assert!(shard < count);
            used.insert(shard);
        }
        assert_eq!(used.len(), count as usize, "spread over every shard");
        let name = ShardName { shard: 0, count: 1 };
        assert_eq!(ShardName::parse("a", &name.config_map("a")), Some(name));
        assert_eq!(
            ShardName::parse("a", &format!("{}0-of-1", name_prefix("a"))),
            None
        );
        assert_eq!(
            ShardName::parse("a", &format!("{}2-of-1", name_prefix("a"))),
            None
        );
        assert_eq!(
            ShardName::parse("a", &format!("{}01-of-1", name_prefix("a"))),
            None
        );
    }
}
