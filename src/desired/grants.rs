//! Grants: which initiators may log in to the served targets, with which credentials and LUNs.

use std::collections::BTreeMap;

use super::targets::Placement;
use super::{
    AclConfig, BootConfig, Checked, DesiredState, Inputs, Kind, MappedLun, ObjectKey, Problem,
    Reason,
};
use crate::api::InitiatorAccess;
use crate::api::chap::ChapCredentials;
use crate::api::initiator_access::{ValidBoot, ValidGrant};
use crate::api::mac::MacAddress;

pub(super) fn resolve(
    inputs: &Inputs<'_>,
    placements: &BTreeMap<ObjectKey, Placement>,
    state: &mut DesiredState,
) {
    // Oldest first: of two grants for one initiator on one target, the older one wins.
    let mut lapsed = LapsedClaims::new();
    for grant in &inputs.snapshot.grants {
        if let Err((reason, message)) = apply(inputs, placements, grant, state, &mut lapsed) {
            state.problems.push(Problem {
                kind: Kind::InitiatorAccess,
                key: grant.key.clone(),
                reason,
                message,
            });
        }
    }
    withhold_shared_cards(state);
}

/// A card two grants name boots through neither: a request names a card, never a grant, and
/// which grant is older says nothing about whose machine it is (any namespace may name any
/// card). Each grant involved says so; their access is untouched.
fn withhold_shared_cards(state: &mut DesiredState) {
    let mut owners: BTreeMap<MacAddress, Vec<ObjectKey>> = BTreeMap::new();
    for (grant, config) in &state.boots {
        for mac in &config.macs {
            owners.entry(*mac).or_default().push(grant.clone());
        }
    }
    for (mac, grants) in owners.into_iter().filter(|(_, g)| g.len() > 1) {
        for grant in &grants {
            let others: Vec<String> = (grants.iter())
                .filter(|g| *g != grant)
                .map(ToString::to_string)
                .collect();
            state.problems.push(Problem {
                kind: Kind::InitiatorAccess,
                key: grant.clone(),
                reason: Reason::DuplicateBootMac,
                message: format!(
                    "spec.boot.macAddresses: {mac} is also named by InitiatorAccess {}; a card \
                     boots through one grant, so it boots through none until only one names it",
                    others.join(", ")
                ),
            });
            if let Some(config) = state.boots.get_mut(grant) {
                config.macs.retain(|m| *m != mac);
            }
        }
    }
    state.boots.retain(|_, config| !config.macs.is_empty());
}

/// The initiators, by target, of held grants that lapsed: still theirs, so that a newer grant
/// for the same initiator never takes over while the holder is silent.
type LapsedClaims = BTreeMap<(usize, String), ObjectKey>;

/// Adds the grant's ACL to its target, or says why it cannot. `Ok` also covers the grants that
/// rightly have no ACL here: expired, or for a target this node does not serve.
fn apply(
    inputs: &Inputs<'_>,
    placements: &BTreeMap<ObjectKey, Placement>,
    grant: &Checked<'_, InitiatorAccess, ValidGrant>,
    state: &mut DesiredState,
    lapsed: &mut LapsedClaims,
) -> Result<(), (Reason, String)> {
    let key = &grant.key;
    let valid =
        (grant.valid.as_ref()).map_err(|errors| (Reason::InvalidSpec, errors.to_string()))?;
    if inputs.snapshot.expired(key, inputs.now) {
        state.expired.push(key.clone());
        return Ok(());
    }

    let target_key = key.sibling(&valid.target);
    let index = match placements.get(&target_key) {
        None => {
            return Err((
                Reason::TargetNotFound,
                format!("IscsiTarget {} not found", valid.target),
            ));
        }
        Some(Placement::NotHere) => return Ok(()),
        Some(Placement::Blocked(why)) => {
            return Err((
                Reason::TargetNotServed,
                format!(
                    "IscsiTarget {} is not served on node {}: {why}",
                    valid.target, inputs.node.name
                ),
            ));
        }
        Some(Placement::Served(index)) => *index,
    };
    let target = &state.targets[index];
    let claim = (index, valid.initiator.clone());
    let older = (target.acls.iter())
        .find(|acl| acl.initiator == valid.initiator)
        .map(|acl| &acl.grant)
        .or_else(|| lapsed.get(&claim));
    if let Some(older) = older {
        return Err((
            Reason::DuplicateGrant,
            format!(
                "InitiatorAccess {} already gives {} access to IscsiTarget {}, and is older; \
                 list every LUN in one grant",
                older.name, valid.initiator, valid.target
            ),
        ));
    }
    // Not held: no ACL, and the initiator stays the grant's.
    match super::holds::check(inputs, key, valid) {
        Ok(Some(until)) => {
            state.next_lapse = Some(state.next_lapse.map_or(until, |next| next.min(until)));
        }
        Ok(None) => {}
        Err(why) => {
            lapsed.insert(claim, key.clone());
            return Err(why);
        }
    }
    let target = &state.targets[index];
    let chap = credentials(inputs, key, valid, target.chap_required, &valid.target)?;
    let luns = mapped_luns(valid, target)?;
    // A boot block that cannot boot withholds the script, never the access.
    if let Some(boot) = &valid.boot {
        match boot_config(boot, valid, &luns, &target.owner.name) {
            Ok(config) => {
                state.boots.insert(key.clone(), config);
            }
            Err((reason, message)) => state.problems.push(Problem {
                kind: Kind::InitiatorAccess,
                key: key.clone(),
                reason,
                message,
            }),
        }
    }
    let target = &mut state.targets[index];
    target.acls.push(AclConfig {
        initiator: valid.initiator.clone(),
        grant: key.clone(),
        chap,
        luns,
    });
    target.acls.sort_by(|a, b| a.initiator.cmp(&b.initiator));
    Ok(())
}

fn credentials(
    inputs: &Inputs<'_>,
    key: &ObjectKey,
    grant: &ValidGrant,
    chap_required: bool,
    target: &str,
) -> Result<Option<ChapCredentials>, (Reason, String)> {
    let chap = match (&grant.chap, chap_required) {
        (None, false) => return Ok(None),
        (None, true) => {
            return Err((
                Reason::ChapRequired,
                format!(
                    "spec.chap: IscsiTarget {target} requires CHAP; name a Secret in spec.chap.secretRef \
                     (or set the target's authentication to none)"
                ),
            ));
        }
        (Some(_), false) => {
            return Err((
                Reason::ChapNotUsed,
                format!(
                    "spec.chap: IscsiTarget {target} has authentication none, so these credentials would \
                     not be checked; remove spec.chap or set the target's authentication to chap"
                ),
            ));
        }
        (Some(chap), true) => chap,
    };
    let secret_key = key.sibling(&chap.secret_ref.name);
    let Some(data) = inputs.snapshot.secrets.get(&secret_key) else {
        return Err(if chap.generate_secret {
            (
                Reason::SecretPending,
                format!("Secret {} is not generated yet", chap.secret_ref.name),
            )
        } else {
            (
                Reason::SecretNotFound,
                format!(
                    "spec.chap.secretRef: Secret {} not found",
                    chap.secret_ref.name
                ),
            )
        });
    };
    ChapCredentials::from_secret_data(data, chap.mutual)
        .map(Some)
        .map_err(|errors| {
            (
                Reason::SecretInvalid,
                format!("Secret {}: {errors}", chap.secret_ref.name),
            )
        })
}

/// The target's LUNs the grant names (all when it names none). A grant never makes a read-only
/// LUN writable: each mapped LUN is read-only when either the grant or the LUN is.
fn mapped_luns(
    grant: &ValidGrant,
    target: &super::TargetConfig,
) -> Result<Vec<MappedLun>, (Reason, String)> {
    let read_only = |lun: &super::LunConfig| grant.read_only || lun.read_only;
    match &grant.luns {
        None => Ok(target
            .luns
            .iter()
            .map(|lun| MappedLun {
                lun: lun.lun,
                read_only: read_only(lun),
            })
            .collect()),
        Some(numbers) => {
            let mut mapped = Vec::new();
            for number in numbers {
                let Some(lun) = target.luns.iter().find(|l| l.lun == *number) else {
                    return Err((
                        Reason::LunNotFound,
                        format!(
                            "spec.luns: IscsiTarget {} has no LUN {number}",
                            target.owner.name
                        ),
                    ));
                };
                mapped.push(MappedLun {
                    lun: *number,
                    read_only: read_only(lun),
                });
            }
            mapped.sort_by_key(|m| m.lun);
            Ok(mapped)
        }
    }
}

/// The grant's boot block against its ACL: the LUN it boots from is one the ACL maps.
fn boot_config(
    boot: &ValidBoot,
    grant: &ValidGrant,
    luns: &[MappedLun],
    target: &str,
) -> Result<BootConfig, (Reason, String)> {
    let lun = match boot.lun {
        Some(lun) if luns.iter().any(|m| m.lun == lun) => lun,
        Some(lun) => {
            return Err((
                Reason::BootLunNotFound,
                format!("spec.boot.lun: IscsiTarget {target} has no LUN {lun}"),
            ));
        }
        None => (luns.first().map(|m| m.lun)).ok_or_else(|| {
            (
                Reason::BootLunNotFound,
                format!("spec.boot: IscsiTarget {target} has no LUN to boot from"),
            )
        })?,
    };
    Ok(BootConfig {
        macs: boot.macs.clone(),
        sources: boot.sources.clone(),
        lun,
        expires_at: grant.expires_at,
    })
}
