//! Which machine may boot through which grant on this node, and the decision for one request.
//!
//! The table holds only grants whose ACL this node has applied, so a script never names access
//! the target does not give. A pass first drops every entry the new declarations no longer back
//! (before it changes the target), and after applying it holds exactly the applied boot grants:
//! access is revoked in the table no later than in the target. Expiry is checked again against
//! the clock on every request, so a sync loop that is late never lets an expired grant boot.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use crate::api::InitiatorAccess;
use crate::api::chap::ChapCredentials;
use crate::api::iscsi_target::Portal;
use crate::api::mac::MacAddress;
use crate::desired::{
    AclConfig, BootConfig, DesiredState, Kind, ObjectKey, TargetConfig, object_key,
};
use crate::sync::NodeReport;

/// One grant a machine may boot through, as this node applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub grant: ObjectKey,
    /// The InitiatorAccess's uid, for the Event that records each script served.
    pub uid: Option<String>,
    pub config: BootConfig,
    /// The initiator name the script sets: the grant's, whatever the machine calls itself.
    pub initiator: String,
    pub chap: Option<ChapCredentials>,
    pub iqn: String,
    /// The LUN number the initiator sees (tgt's LUN 0 is its controller).
    pub device_lun: u32,
    /// This node's portals (wildcards stand for the address the request came in on), then
    /// those other nodes report for the grant: the paths of a multipath boot.
    pub portals: Vec<Portal>,
}

/// Why a request gets no script. Every refusal gets the same answer; the log says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Refusal {
    /// The request names no MAC address, or not one that parses.
    NoMac,
    /// No grant applied here boots this card.
    UnknownMac,
    /// The grant is past its `expiresAt`.
    Expired,
    /// The request comes from outside the grant's `sourceCidrs`.
    SourceNotAllowed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The boot grants of this node, by card.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootTable {
    by_mac: BTreeMap<MacAddress, Arc<BootEntry>>,
}

impl BootTable {
    /// The grants whose machines this table boots.
    pub fn grants(&self) -> std::collections::BTreeSet<ObjectKey> {
        self.by_mac.values().map(|e| e.grant.clone()).collect()
    }

    /// The boot grants a pass applied. `grants` are the declarations, those with a boot block
    /// with their node entries, where the other nodes serving a grant report their portals.
    pub fn applied(report: &NodeReport, grants: &[InitiatorAccess]) -> Self {
        let elsewhere = portals_elsewhere(&report.node, grants);
        let mut table = Self::default();
        for (grant, config) in &report.desired.boots {
            let Some((target, acl)) = report.grant_acl(grant) else {
                continue;
            };
            if !applied_here(report, grant, target, acl) {
                continue;
            }
            let mut portals = target.portals.clone();
            let reported = elsewhere.get(&(grant.clone(), target.iqn.clone()));
            for portal in reported.into_iter().flatten() {
                if !portals.contains(portal) {
                    portals.push(*portal);
                }
            }
            let lun = config.lun;
            table.insert(BootEntry {
                grant: grant.clone(),
                uid: report.grant_uids.get(grant).cloned(),
                config: config.clone(),
                initiator: acl.initiator.clone(),
                chap: acl.chap.clone(),
                iqn: target.iqn.clone(),
                device_lun: report.device_lun(lun).unwrap_or(lun),
                portals,
            });
        }
        table
    }

    /// Drops every entry the new desired state does not back exactly as it is: before a pass
    /// changes the target, a revoked or changed grant stops booting.
    pub fn retain_desired(&mut self, state: &DesiredState) {
        let acls: BTreeMap<&ObjectKey, (&TargetConfig, &AclConfig)> = (state.targets.iter())
            .flat_map(|t| t.acls.iter().map(move |a| (&a.grant, (t, a))))
            .collect();
        self.by_mac.retain(|_, entry| {
            let backed = acls.get(&entry.grant).is_some_and(|(target, acl)| {
                target.iqn == entry.iqn
                    && acl.initiator == entry.initiator
                    && acl.chap == entry.chap
                    && target.portals.iter().all(|p| entry.portals.contains(p))
            });
            backed && state.boots.get(&entry.grant) == Some(&entry.config)
        });
    }

    fn insert(&mut self, entry: BootEntry) {
        let entry = Arc::new(entry);
        for mac in &entry.config.macs {
            self.by_mac.insert(*mac, Arc::clone(&entry));
        }
    }

    /// The grant a request may boot through: the card it names, from where it comes, now.
    pub fn decide(
        &self,
        mac: &str,
        source: IpAddr,
        now: Timestamp,
    ) -> Result<Arc<BootEntry>, Refusal> {
        let mac: MacAddress = mac.parse().map_err(|_| Refusal::NoMac)?;
        let entry = self.by_mac.get(&mac).ok_or(Refusal::UnknownMac)?;
        if entry.config.expires_at.is_some_and(|end| now >= end) {
            return Err(Refusal::Expired);
        }
        let sources = &entry.config.sources;
        if !sources.is_empty() && !sources.iter().any(|net| net.contains(&source)) {
            return Err(Refusal::SourceNotAllowed);
        }
        Ok(Arc::clone(entry))
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }
}

/// Whether the pass left the grant's ACL in place as declared: nothing unsettled, and nothing
/// refused of it or of its target (a backend limit, a foreign object of the same name) — the
/// same judgement as the grant's status, apart from problems that concern only its boot block.
fn applied_here(
    report: &NodeReport,
    grant: &ObjectKey,
    target: &TargetConfig,
    acl: &AclConfig,
) -> bool {
    report
        .unsettled_messages(&target.iqn, Some(&acl.initiator))
        .is_empty()
        && report
            .problems_of(Kind::InitiatorAccess, grant)
            .all(|p| p.reason.is_boot())
        && report
            .problems_of(Kind::IscsiTarget, &target.owner)
            .next()
            .is_none()
}

/// The portals other nodes report for each grant they applied, by grant and the target IQN
/// they report it under (a portal of another target is never a path to this one).
fn portals_elsewhere(
    node: &str,
    grants: &[InitiatorAccess],
) -> BTreeMap<(ObjectKey, String), Vec<Portal>> {
    let mut portals: BTreeMap<(ObjectKey, String), Vec<Portal>> = BTreeMap::new();
    for grant in grants {
        let entries = grant.status.iter().flat_map(|s| &s.nodes);
        for entry in entries.filter(|e| e.node != node && e.applied) {
            let Some(connection) = &entry.connection else {
                continue;
            };
            let parsed = connection
                .portals
                .iter()
                .filter_map(|text| text.parse::<SocketAddr>().ok())
                .filter(|address| !address.ip().is_unspecified() && address.port() != 0)
                .map(|address| Portal {
                    address: address.ip(),
                    port: address.port(),
                });
            portals
                .entry((object_key(&grant.metadata), connection.iqn.clone()))
                .or_default()
                .extend(parsed);
        }
    }
    portals
}
