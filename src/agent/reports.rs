//! Node reports: how each node tells the lease holder what it made of every object — its
//! entries — in a few ConfigMaps of its own in the agents' namespace, rather than in a status
//! write to each object. On a cold start of 3001 objects, three nodes wrote some 9000 status
//! patches of their entries, each decoded and merged into the whole object by the apiserver,
//! which on two cores made the user's own `kubectl apply` several times slower; a shard of about
//! a hundred entries costs the apiserver about what one such patch did. The lease holder merges
//! the reports into each object's `status.nodes`, with the conditions, in one write per object.
//!
//! A node's entries are spread over `shard_count` ConfigMaps by a hash of the object, so that a
//! change of one object rewrites one shard; the count is in each name, and a node whose count
//! changes writes the new set before it deletes the old. Only the node writes its reports; the
//! lease holder deletes those of a node that is gone. A report names its node, and its name
//! must be the one that node's reports have: one that does not fit is not read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::desired::{Kind, ObjectKey};

use super::StatusBody;
use super::heartbeat::node_hash;

/// The label of every report; its value is the node's name hashed (see `heartbeat`).
pub const REPORT_LABEL: &str = "discus.dev/report";
/// About this many entries per shard (at most a few times as many, by chance): a shard of 128
/// grant entries with a session each is some 40 KiB, far below a ConfigMap's 1 MiB.
const ENTRIES_PER_SHARD: usize = 128;
/// The data keys of a report.
const NODE_KEY: &str = "node";
const ENTRIES_KEY: &str = "entries";

/// How many shards a node with `entries` entries spreads them over: a power of two, so that the
/// count changes seldom as objects come and go.
pub fn shard_count(entries: usize) -> u32 {
    let shards = entries
        .div_ceil(ENTRIES_PER_SHARD)
        .max(1)
        .next_power_of_two();
    u32::try_from(shards).unwrap_or(u32::MAX)
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

/// A report as the ConfigMap's data: the node, and its entries in the order of their objects.
pub fn data<'a>(
    node: &str,
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
        (ENTRIES_KEY.to_owned(), serde_json::to_string(&out)?),
    ]))
}

/// A report read back.
#[derive(Debug)]
pub struct Report {
    pub node: String,
    pub name: ShardName,
    pub records: Records,
}

/// Reads a report; why not when it is not one (no node, a name that is not that node's, entries
/// that do not decode).
pub fn read(config_map: &ConfigMap) -> Result<Report, String> {
    let data = config_map.data.as_ref();
    let field = |key: &str| data.and_then(|d| d.get(key)).map(String::as_str);
    let node = field(NODE_KEY).ok_or("it names no node")?;
    let name = ShardName::parse(node, &config_map.name_any())
        .ok_or_else(|| format!("its name is not one of node {node}'s reports"))?;
    let listed: Vec<RecordIn> = serde_json::from_str(field(ENTRIES_KEY).unwrap_or("[]"))
        .map_err(|error| format!("its entries do not decode: {error}"))?;
    let mut records = Records::new();
    for record in listed {
        let kind =
            Kind::parse(&record.kind).ok_or_else(|| format!("unknown kind {:?}", record.kind))?;
        let key = ObjectKey::new(record.namespace, record.name);
        let reported = Reported {
            uid: record.uid,
            entry: record.entry,
        };
        records.insert((kind, key), reported);
    }
    Ok(Report {
        node: node.to_owned(),
        name,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let count = shard_count(records.len());
        let name = ShardName::of(Kind::IscsiTarget, &key, count);
        let data = data("a", &records).expect("data");
        let report = read(&config_map(&name.config_map("a"), data.clone())).expect("read");
        assert_eq!((report.node.as_str(), &report.name), ("a", &name));
        assert_eq!(report.records, records);
        // The same data under another node's name (or a made-up one) is not node a's report.
        for name in [name.config_map("b"), "discus-report-x-1-of-1".to_owned()] {
            assert!(read(&config_map(&name, data.clone())).is_err(), "{name}");
        }
    }

    #[test]
    fn shards_grow_by_powers_of_two_and_every_object_has_one() {
        assert_eq!(shard_count(0), 1);
        assert_eq!(shard_count(128), 1);
        assert_eq!(shard_count(129), 2);
        assert_eq!(shard_count(3001), 32);
        let count = shard_count(3001);
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
