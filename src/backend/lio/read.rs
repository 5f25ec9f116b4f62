//! Reads configfs into the typed model. Blocking: callers run it on a blocking thread.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use super::layout::{AclDir, Root, StorageDir, TpgDir, lun_index, tpg_tag};
use super::model::{Acl, LioState, LioTarget, MappedLun, StorageObject, Tpg, TpgLun};
use crate::api::chap::Password;

/// The TPG attributes discus sets, and so reads.
pub const ATTRIBUTES: [&str; 6] = [
    "generate_node_acls",
    "authentication",
    "demo_mode_write_protect",
    "prod_mode_write_protect",
    "cache_dynamic_acls",
    "demo_mode_discovery",
];

/// An attribute's value, "" when it cannot be read.
fn text(path: &Path) -> String {
    read_text(path).unwrap_or_default()
}

fn read_text(path: &Path) -> io::Result<String> {
    // configfs appends a newline to what it shows.
    std::fs::read_to_string(path).map(|t| t.strip_suffix('\n').map(str::to_owned).unwrap_or(t))
}

fn dirs(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    match std::fs::read_dir(path) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok(names)
}

/// The link targets in a folder (LUN links, mapped LUN links), as the last components of their
/// paths.
fn links(path: &Path) -> io::Result<Vec<Vec<String>>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            found.push(
                target
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect(),
            );
        }
    }
    Ok(found)
}

pub fn read(root: &Root) -> io::Result<LioState> {
    read_parts(root, None)
}

/// Reads the targets `iqns` and the storage objects they link or `storage` names, and the list
/// of HBAs: enough to plan changes to those targets alone.
pub fn read_scoped(
    root: &Root,
    iqns: &BTreeSet<String>,
    storage: &BTreeSet<String>,
) -> io::Result<LioState> {
    read_parts(root, Some((iqns, storage)))
}

fn read_parts(
    root: &Root,
    scope: Option<(&BTreeSet<String>, &BTreeSet<String>)>,
) -> io::Result<LioState> {
    let mut state = LioState::default();
    let iqns: Vec<String> = match scope {
        Some((iqns, _)) => iqns
            .iter()
            .filter(|i| root.target(i).is_dir())
            .cloned()
            .collect(),
        None => dirs(&root.iscsi())?
            .into_iter()
            .filter(|i| i != "discovery_auth")
            .collect(),
    };
    state.targets = parallel(iqns, |iqn| {
        let mut target = LioTarget {
            iqn: iqn.clone(),
            tpgs: Vec::new(),
        };
        for tpgt in dirs(&root.target(&iqn))? {
            let Some(tag) = tpg_tag(&tpgt) else {
                continue;
            };
            target.tpgs.push(tpg(&root.tpg(&iqn, tag), tag)?);
        }
        Ok(target)
    })?;
    // The storage objects the scoped targets link, and those they will.
    let wanted: Option<BTreeSet<String>> = scope.map(|(_, storage)| {
        let linked = state
            .targets
            .iter()
            .flat_map(|t| &t.tpgs)
            .flat_map(|t| &t.luns);
        storage
            .iter()
            .cloned()
            .chain(linked.filter_map(|l| l.storage.as_ref().map(|(_, so)| so.clone())))
            .collect()
    });
    let mut objects = Vec::new();
    for hba in dirs(&root.core())? {
        // `alua` and the like hold no storage objects.
        if !hba.contains('_') {
            continue;
        }
        match &wanted {
            Some(names) => {
                objects.extend(
                    names
                        .iter()
                        .filter(|n| root.storage(&hba, n).path().is_dir())
                        .map(|n| (hba.clone(), n.clone())),
                );
            }
            None => objects.extend(
                dirs(&root.hba(&hba))?
                    .into_iter()
                    .map(|name| (hba.clone(), name)),
            ),
        }
        state.hbas.push(hba);
    }
    state.storage = parallel(objects, |(hba, name)| {
        let dir = root.storage(&hba, &name);
        Ok(dir
            .info()
            .exists()
            .then(|| storage_object(&dir, &hba, &name)))
    })?
    .into_iter()
    .flatten()
    .collect();
    Ok(state)
}

/// Reads many independent parts of configfs on a few threads, keeping their order: with
/// hundreds of targets, reading is most of a sync's work.
fn parallel<T: Send, R: Send>(
    items: Vec<T>,
    read: impl Fn(T) -> io::Result<R> + Sync,
) -> io::Result<Vec<R>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    if threads == 1 || items.len() < 32 {
        return items.into_iter().map(read).collect();
    }
    let size = items.len().div_ceil(threads);
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(size).collect());
    }
    let read = &read;
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || chunk.into_iter().map(read).collect::<io::Result<Vec<R>>>())
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(
                handle
                    .join()
                    .map_err(|_| io::Error::other("a configfs reader panicked"))??,
            );
        }
        Ok(all)
    })
}

fn storage_object(dir: &StorageDir, hba: &str, name: &str) -> StorageObject {
    let info = storage_info(&text(&dir.info()));
    StorageObject {
        hba: hba.to_owned(),
        name: name.to_owned(),
        enabled: text(&dir.enable()) == "1",
        file: info.file,
        size: info.size,
        buffered: info.buffered,
        serial: text(&dir.unit_serial())
            .trim_start_matches("T10 VPD Unit Serial Number:")
            .trim()
            .to_owned(),
        block_size: text(&dir.block_size()).parse().unwrap_or(0),
    }
}

/// What a storage object's `info` says of its backing file.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StorageInfo {
    pub file: Option<String>,
    pub size: Option<u64>,
    pub buffered: bool,
}

/// "… SectorSize: 512 …\n TCM FILEIO ID: 0  File: /path  Size: 1048576  Mode: O_DSYNC …"
pub(crate) fn storage_info(info: &str) -> StorageInfo {
    let tokens: Vec<&str> = info.split_whitespace().collect();
    let field = |key: &str| {
        tokens
            .windows(2)
            .find(|pair| pair[0] == key)
            .map(|pair| pair[1].to_owned())
    };
    StorageInfo {
        file: field("File:"),
        size: field("Size:").and_then(|s| s.parse().ok()),
        buffered: info.contains("Buffered-WCE"),
    }
}

/// The addresses of an ACL's logged-in connections, from its `info`: "   Address 10.0.2.2 TCP …".
pub(crate) fn session_addresses(info: &str) -> Vec<String> {
    info.lines()
        .filter_map(|l| l.trim().strip_prefix("Address "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn tpg(dir: &TpgDir, tag: u16) -> io::Result<Tpg> {
    let mut tpg = Tpg {
        tag,
        enabled: text(&dir.enable()) == "1",
        alias: text(&dir.alias()),
        attributes: ATTRIBUTES
            .iter()
            .map(|a| ((*a).to_owned(), text(&dir.attribute(a))))
            .collect(),
        portals: dirs(&dir.portals())?,
        ..Tpg::default()
    };
    for lun in dirs(&dir.luns())? {
        let Some(index) = lun_index(&lun) else {
            continue;
        };
        let storage = links(&dir.lun(index))?.into_iter().find_map(|parts| {
            let n = parts.len();
            (n >= 2).then(|| (parts[n - 2].clone(), parts[n - 1].clone()))
        });
        tpg.luns.push(TpgLun { index, storage });
    }
    for initiator in dirs(&dir.acls())? {
        tpg.acls.push(acl(&dir.acl(&initiator), &initiator)?);
    }
    Ok(tpg)
}

fn acl(dir: &AclDir, initiator: &str) -> io::Result<Acl> {
    let secret = |file: &str| {
        let value = text(&dir.auth(file));
        (!value.is_empty() && value != "NULL").then(|| Password::new(value))
    };
    let userid = |file: &str| {
        Some(text(&dir.auth(file)))
            .filter(|v| v != "NULL")
            .unwrap_or_default()
    };
    let mut acl = Acl {
        initiator: initiator.to_owned(),
        userid: userid("userid"),
        password: secret("password"),
        userid_mutual: userid("userid_mutual"),
        password_mutual: secret("password_mutual"),
        ..Acl::default()
    };
    for lun in dirs(dir.path())? {
        let Some(index) = lun_index(&lun) else {
            continue;
        };
        let tpg_lun = links(&dir.mapped_lun(index))?
            .into_iter()
            .find_map(|parts| lun_index(parts.last()?));
        acl.mapped.push(MappedLun {
            index,
            tpg_lun,
            write_protect: text(&dir.write_protect(index)) == "1",
        });
    }
    // Unreadable is not "no session": the reading fails rather than tell logouts that did not
    // happen.
    acl.sessions = session_addresses(&read_text(&dir.info())?);
    Ok(acl)
}
