//! Targets: which ones this node serves, with which portals and LUNs.

use std::collections::BTreeMap;

use kube::Resource;
use kube::core::SelectorExt;
use sha2::{Digest, Sha256};

use super::{
    Backing, Checked, DesiredState, Inputs, Kind, LunConfig, ObjectKey, Problem, ReadyImage,
    Reason, TargetConfig,
};
use crate::api::iscsi_target::{DeviceType, Portal, ValidLun, ValidTarget};
use crate::api::{IscsiTarget, rules};

/// What became of a target on this node; grants follow their target.
pub(super) enum Placement {
    /// Served: the index into `DesiredState::targets`.
    Served(usize),
    /// Its `nodeSelector` does not select this node.
    NotHere,
    /// It should be served here but cannot be; the message says why.
    Blocked(String),
}

/// Reports the invalid DiscImages, and marks those this node prefetches. Returns, per image,
/// `Ok` or why it is invalid.
pub(super) fn index_images(
    inputs: &Inputs<'_>,
    state: &mut DesiredState,
) -> BTreeMap<ObjectKey, Result<(), String>> {
    let mut images = BTreeMap::new();
    for image in &inputs.snapshot.images {
        let validity = match &image.valid {
            Ok(valid) => {
                if valid
                    .node_selector
                    .as_ref()
                    .is_some_and(|selector| selector.matches(&inputs.node.labels))
                {
                    state.needed_images.insert(image.key.clone());
                }
                Ok(())
            }
            Err(errors) => {
                state.problems.push(Problem {
                    kind: Kind::DiscImage,
                    key: image.key.clone(),
                    reason: Reason::InvalidSpec,
                    message: errors.to_string(),
                });
                Err(errors.to_string())
            }
        };
        images.insert(image.key.clone(), validity);
    }
    images
}

/// Decides every target's placement, oldest first so that the oldest claim on an IQN wins.
pub(super) fn resolve(
    inputs: &Inputs<'_>,
    images: &BTreeMap<ObjectKey, Result<(), String>>,
    state: &mut DesiredState,
) -> BTreeMap<ObjectKey, Placement> {
    let mut placements = BTreeMap::new();
    let mut iqn_owners: BTreeMap<String, ObjectKey> = BTreeMap::new();
    for target in &inputs.snapshot.targets {
        let placement = place(inputs, images, target, &mut iqn_owners, state);
        placements.insert(target.key.clone(), placement);
    }
    placements
}

fn place(
    inputs: &Inputs<'_>,
    images: &BTreeMap<ObjectKey, Result<(), String>>,
    target: &Checked<'_, IscsiTarget, ValidTarget>,
    iqn_owners: &mut BTreeMap<String, ObjectKey>,
    state: &mut DesiredState,
) -> Placement {
    let key = &target.key;
    let problem = |reason: Reason, message: String| Problem {
        kind: Kind::IscsiTarget,
        key: key.clone(),
        reason,
        message,
    };
    let (valid, iqn) = match claim(inputs, target, iqn_owners, state) {
        Ok(claimed) => claimed,
        Err((reason, message)) => return block(vec![problem(reason, message)], state),
    };
    if valid
        .node_selector
        .as_ref()
        .is_some_and(|selector| !selector.matches(&inputs.node.labels))
    {
        return Placement::NotHere;
    }
    for lun in &valid.luns {
        state.needed_images.insert(key.sibling(&lun.image));
    }
    let portals = portals(valid, inputs);
    let mut problems: Vec<Problem> = unservable(inputs, valid, &portals)
        .into_iter()
        .map(|(reason, message)| problem(reason, message))
        .collect();
    let mut luns = Vec::new();
    for lun in &valid.luns {
        let image = key.sibling(&lun.image);
        match ready_image(images, inputs, lun, &image) {
            Ok(ready) => luns.push(lun_config(lun, image, ready, target.object, key, inputs)),
            Err((reason, message)) => problems.push(problem(reason, message)),
        }
    }
    if !problems.is_empty() {
        return block(problems, state);
    }
    luns.sort_by_key(|l| l.lun);
    state.targets.push(TargetConfig {
        iqn,
        owner: key.clone(),
        portals,
        chap_required: valid.authentication == crate::api::iscsi_target::Authentication::Chap,
        luns,
        acls: Vec::new(),
    });
    Placement::Served(state.targets.len() - 1)
}

/// A valid target and the IQN it claims, or why it cannot claim one. Claims are settled before
/// placement, so the same target wins on every node; a refused IQN claims nothing, so a
/// namespace cannot take another's name.
fn claim<'t>(
    inputs: &Inputs<'_>,
    target: &'t Checked<'_, IscsiTarget, ValidTarget>,
    iqn_owners: &mut BTreeMap<String, ObjectKey>,
    state: &mut DesiredState,
) -> Result<(&'t ValidTarget, String), (Reason, String)> {
    let key = &target.key;
    let valid =
        (target.valid.as_ref()).map_err(|errors| (Reason::InvalidSpec, errors.to_string()))?;
    let iqn = effective_iqn(valid, key, &inputs.settings.iqn_authority)
        .map_err(|message| (Reason::InvalidSpec, message))?;
    state.iqns.insert(key.clone(), iqn.clone());
    if valid.iqn.is_some()
        && let Some(why) =
            inputs
                .settings
                .policy
                .refuse_iqn(&iqn, &key.namespace, &inputs.settings.iqn_authority)
    {
        return Err((Reason::IqnNotAllowed, why));
    }
    if let Some(owner) = iqn_owners.get(&iqn) {
        return Err((
            Reason::IqnConflict,
            format!("IQN {iqn} is already used by IscsiTarget {owner}, which is older"),
        ));
    }
    iqn_owners.insert(iqn.clone(), key.clone());
    Ok((valid, iqn))
}

/// What keeps a target placed here from being served, whatever its images: a device type the
/// backend lacks, portals the administrator does not allow, or none at all.
fn unservable(
    inputs: &Inputs<'_>,
    valid: &ValidTarget,
    portals: &[Portal],
) -> Vec<(Reason, String)> {
    let mut problems = Vec::new();
    if !inputs.settings.cdrom_supported
        && let Some(lun) = valid
            .luns
            .iter()
            .find(|l| l.device_type == DeviceType::Cdrom)
    {
        problems.push((
            Reason::UnsupportedDeviceType,
            format!(
                "LUN {}: deviceType cdrom needs the tgt backend; this node's backend presents disks only",
                lun.lun
            ),
        ));
    }
    for portal in &valid.portals {
        if let Some(why) = inputs
            .settings
            .policy
            .refuse_portal(portal, &inputs.node.addresses)
        {
            problems.push((Reason::PortalNotAllowed, why));
        }
    }
    if portals.is_empty() {
        problems.push((
            Reason::NoPortal,
            format!(
                "node {} has no InternalIP address; list spec.portals",
                inputs.node.name
            ),
        ));
    }
    problems
}

/// A LUN's image, verified and stored here, or why not.
fn ready_image<'a>(
    images: &BTreeMap<ObjectKey, Result<(), String>>,
    inputs: &'a Inputs<'_>,
    lun: &ValidLun,
    image: &ObjectKey,
) -> Result<&'a ReadyImage, (Reason, String)> {
    match (images.get(image), inputs.ready.get(image)) {
        (None, _) => Err((
            Reason::ImageNotFound,
            format!("LUN {}: DiscImage {} not found", lun.lun, lun.image),
        )),
        (Some(Err(why)), _) => Err((
            Reason::ImageInvalid,
            format!("LUN {}: DiscImage {} is invalid: {why}", lun.lun, lun.image),
        )),
        (Some(Ok(())), None) => Err((
            Reason::ImageNotReady,
            format!(
                "LUN {}: DiscImage {} is not ready on node {}",
                lun.lun, lun.image, inputs.node.name
            ),
        )),
        (Some(Ok(())), Some(ready)) => Ok(ready),
    }
}

fn block(problems: Vec<Problem>, state: &mut DesiredState) -> Placement {
    let summary = problems
        .iter()
        .map(|p| format!("{}: {}", p.reason, p.message))
        .collect::<Vec<_>>()
        .join("; ");
    state.problems.extend(problems);
    Placement::Blocked(summary)
}

/// `spec.iqn`, or `<authority>:<namespace>.<name>`.
pub(super) fn effective_iqn(
    target: &ValidTarget,
    key: &ObjectKey,
    authority: &str,
) -> Result<String, String> {
    match &target.iqn {
        Some(iqn) => Ok(iqn.clone()),
        None => {
            let iqn = format!("{authority}:{}.{}", key.namespace, key.name);
            rules::iscsi_name(&iqn)
                .map(|()| iqn.clone())
                .map_err(|e| format!("spec.iqn: the default IQN {iqn} {e}; set spec.iqn"))
        }
    }
}

fn portals(target: &ValidTarget, inputs: &Inputs<'_>) -> Vec<Portal> {
    if !target.portals.is_empty() {
        return target.portals.clone();
    }
    inputs
        .node
        .addresses
        .iter()
        .map(|&address| Portal {
            address,
            port: rules::DEFAULT_ISCSI_PORT,
        })
        .collect()
}

fn lun_config(
    lun: &ValidLun,
    image: ObjectKey,
    ready: &super::ReadyImage,
    target: &IscsiTarget,
    key: &ObjectKey,
    inputs: &Inputs<'_>,
) -> LunConfig {
    let (backing, serial) = if lun.read_only {
        (
            Backing::Image(ready.path.clone()),
            serial(&["image", &ready.served_sha256, &lun.lun.to_string()]),
        )
    } else {
        // A writable copy diverges from every other node's, so it must never look like the
        // same device to multipath: its identity includes the target's uid and the node.
        let uid = target.meta().uid.as_deref().unwrap_or("");
        let identity = serial(&[
            "writable",
            &key.to_string(),
            uid,
            &inputs.node.name,
            &lun.lun.to_string(),
        ]);
        (
            Backing::WritableCopy {
                seed: ready.path.clone(),
                path: inputs.settings.writable_dir.join(format!(
                    "{}.{}.lun{}-{}.raw",
                    key.namespace,
                    key.name,
                    lun.lun,
                    &identity[..12]
                )),
            },
            identity,
        )
    };
    LunConfig {
        lun: lun.lun,
        image,
        backing,
        size_bytes: ready.size_bytes,
        serial,
        read_only: lun.read_only,
        block_size: lun.block_size,
        device_type: lun.device_type,
    }
}

/// A SCSI unit serial number: 32 hex digits of a SHA-256 over the parts. 32 fits every backend
/// (tgt keeps at most 36, LIO fewer than 254) and makes collisions negligible.
pub(super) fn serial(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"discus-lun-serial-v1");
    for part in parts {
        hash.update([0u8]);
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}
