//! The folder of manifests: what it declares, read again only where a file changed.
//!
//! Input that cannot be read is not "nothing declared": a file that stops parsing, or a folder
//! that cannot be listed, keeps declaring what it declared when it was last read, and the error
//! is reported. Only a file that is gone (from a folder that could be listed) declares nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{self, FieldErrors};
use crate::manifests::{self, Manifest, ObjectId};
use crate::reasons::{Kind, Reason};
use crate::sync::Resources;

/// The manifests of the folder: what can be served, and what is invalid with why.
#[derive(Default)]
pub struct Loaded {
    pub resources: Resources,
    pub invalid: Vec<(ObjectId, FieldErrors)>,
    pub unreadable: Vec<String>,
    /// Objects served as they were last read, because their file cannot be read now or their
    /// new version is invalid: the reason (`ManifestUnreadable`, `InvalidSpec`) and why.
    pub stale: BTreeMap<ObjectId, (Reason, String)>,
    /// Every object a file read again (or gone) defined, before or now: all others are the same
    /// as in the previous load with the same cache, which lets status skip them.
    pub changed: BTreeSet<ObjectId>,
}

/// One document of a file: a manifest discus reads, or why it cannot.
type Decoded = Result<(ObjectId, Manifest), (ObjectId, FieldErrors)>;

/// Modification and change times, size and inode: a file whose stamp is unchanged is not read again.
type Stamp = (std::time::SystemTime, std::time::SystemTime, u64, u64);

/// What one file held, decoded, and how to tell whether it changed since.
struct ParsedFile {
    stamp: Stamp,
    /// What it declared when it was last read whole, if ever.
    documents: Option<Vec<Decoded>>,
    /// Why it cannot be read now.
    error: Option<String>,
    /// DiscImages and IscsiTargets invalid now whose last valid version stands: a typo must
    /// not tear a target down or delete its image.
    kept: BTreeMap<ObjectId, Manifest>,
}

/// Decoded manifests by file, so that a change to one file does not parse them all again.
#[derive(Default)]
pub struct ManifestCache {
    files: BTreeMap<PathBuf, ParsedFile>,
}

impl ParsedFile {
    fn ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.documents
            .iter()
            .flatten()
            .map(|decoded| match decoded {
                Ok((id, _)) | Err((id, _)) => id.clone(),
            })
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let changed = std::time::UNIX_EPOCH
        + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().max(0) as u32);
    Some((meta.modified().ok()?, changed, meta.len(), meta.ino()))
}

/// Reads a file again; when it cannot be read, what it declared before (`last`) stands.
fn parse_file(file: &Path, last: Option<ParsedFile>) -> ParsedFile {
    let read = manifests::read_documents(file)
        .map_err(|e| e.to_string())
        .map(|documents| {
            documents
                .iter()
                .filter_map(|document| {
                    let id = ObjectId::of(document);
                    match manifests::decode(document).and_then(checked) {
                        Ok(Manifest::Other) => None,
                        Ok(manifest) => Some(Ok((id, manifest))),
                        Err(errors) => Some(Err((id, errors))),
                    }
                })
                .collect::<Vec<Decoded>>()
        });
    let stamp = stamp(file).unwrap_or((std::time::UNIX_EPOCH, std::time::UNIX_EPOCH, 0, 0));
    match read {
        Ok(documents) => {
            let kept = kept(&documents, last.as_ref());
            ParsedFile {
                stamp,
                documents: Some(documents),
                error: None,
                kept,
            }
        }
        Err(error) => {
            let (documents, kept) = last.map(|l| (l.documents, l.kept)).unwrap_or_default();
            ParsedFile {
                stamp,
                documents,
                error: Some(error),
                kept,
            }
        }
    }
}

/// The spec rules a manifest's own kind checks (what `desired` would otherwise find later).
fn checked(manifest: Manifest) -> Result<Manifest, FieldErrors> {
    match manifest.spec_errors() {
        Some(errors) => Err(errors),
        None => Ok(manifest),
    }
}

/// The last valid version of each DiscImage and IscsiTarget that is invalid now. A grant that
/// turns invalid is not kept: access ends.
fn kept(documents: &[Decoded], last: Option<&ParsedFile>) -> BTreeMap<ObjectId, Manifest> {
    let Some(last) = last else {
        return BTreeMap::new();
    };
    let valid_before = |id: &ObjectId| {
        last.kept.get(id).cloned().or_else(|| {
            last.documents.iter().flatten().find_map(|d| match d {
                Ok((before, manifest)) if before == id => Some(manifest.clone()),
                _ => None,
            })
        })
    };
    documents
        .iter()
        .filter_map(|d| d.as_ref().err())
        .filter(|(id, _)| {
            matches!(
                Kind::parse(&id.kind),
                Some(Kind::DiscImage | Kind::IscsiTarget)
            )
        })
        .filter_map(|(id, _)| Some((id.clone(), valid_before(id)?)))
        .collect()
}

/// Reads every manifest under `folder`. Nothing in it stops the others from being read.
pub fn load(folder: &Path) -> Loaded {
    load_cached(folder, &mut ManifestCache::default())
}

/// Like `load`, parsing again only the files that changed since the cache saw them.
pub fn load_cached(folder: &Path, cache: &mut ManifestCache) -> Loaded {
    let mut loaded = Loaded::default();
    let files = match manifests::collect_files(&[folder.to_owned()]) {
        Ok(files) => files,
        Err(error) => {
            // The folder cannot be listed (moved away, no permission): every file it held
            // keeps declaring what it declared.
            let error = error.to_string();
            if cache.files.is_empty() {
                loaded.unreadable.push(error.clone());
                loaded.resources.partial = true;
            }
            for parsed in cache.files.values_mut() {
                parsed.error = Some(error.clone());
            }
            cache.files.keys().cloned().collect()
        }
    };
    let listed: BTreeSet<&PathBuf> = files.iter().collect();
    let gone: Vec<PathBuf> = cache
        .files
        .keys()
        .filter(|path| !listed.contains(path))
        .cloned()
        .collect();
    for path in gone {
        if let Some(parsed) = cache.files.remove(&path) {
            loaded.changed.extend(parsed.ids());
        }
    }
    let mut seen = BTreeSet::new();
    for file in files {
        let fresh = cache
            .files
            .get(&file)
            .is_some_and(|parsed| parsed.error.is_none() && Some(parsed.stamp) == stamp(&file));
        if !fresh {
            let last = cache.files.remove(&file);
            let before: Vec<ObjectId> = last.iter().flat_map(ParsedFile::ids).collect();
            let parsed = parse_file(&file, last);
            loaded.changed.extend(parsed.ids());
            loaded.changed.extend(before);
            cache.files.insert(file.clone(), parsed);
        }
        let Some(parsed) = cache.files.get(&file) else {
            continue;
        };
        if let Some(error) = &parsed.error {
            loaded.unreadable.push(error.clone());
            if parsed.documents.is_none() {
                loaded.resources.partial = true;
            }
            for id in parsed.ids() {
                loaded.stale.insert(
                    id,
                    (
                        Reason::ManifestUnreadable,
                        format!("{error}; serving what the file declared when it was last read"),
                    ),
                );
            }
        }
        let Some(documents) = &parsed.documents else {
            continue;
        };
        for document in documents {
            let (id, manifest) = match document {
                Ok((id, manifest)) => (id, manifest),
                Err((id, errors)) => match parsed.kept.get(id) {
                    Some(last_valid) => {
                        let why = format!("{errors}; serving its last valid version");
                        loaded.stale.insert(id.clone(), (Reason::InvalidSpec, why));
                        (id, last_valid)
                    }
                    None => {
                        // Never valid since discus started: what it declared before is
                        // unknown, so nothing it may have declared is removed.
                        if matches!(
                            Kind::parse(&id.kind),
                            Some(Kind::DiscImage | Kind::IscsiTarget)
                        ) {
                            loaded.resources.partial = true;
                        }
                        loaded.invalid.push((id.clone(), errors.clone()));
                        continue;
                    }
                },
            };
            if !seen.insert(id.clone()) {
                let mut errors = FieldErrors::new();
                errors.push(
                    api::FieldPath::root("metadata").child("name"),
                    format!(
                        "{id} is defined twice; the first definition is served ({})",
                        file.display()
                    ),
                );
                loaded.invalid.push((id.clone(), errors));
                continue;
            }
            let r = &mut loaded.resources;
            match manifest {
                Manifest::DiscImage(o) => r.images.push(o.clone()),
                Manifest::IscsiTarget(o) => r.targets.push(o.clone()),
                Manifest::InitiatorAccess(o) => r.grants.push(o.clone()),
                Manifest::Secret(o) => {
                    r.secrets.insert(
                        crate::desired::object_key(&o.metadata),
                        api::chap::secret_data(o),
                    );
                }
                Manifest::Other => {}
            }
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> String {
        format!(
            "---\napiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: {name}, namespace: lab}}\n\
             spec: {{luns: [{{lun: 0, image: disk}}]}}\n"
        )
    }

    fn names(loaded: &Loaded) -> Vec<&str> {
        loaded
            .changed
            .iter()
            .map(|id| id.key.name.as_str())
            .collect()
    }

    #[test]
    fn only_objects_of_files_read_again_count_as_changed() {
        let folder = tempfile::tempdir().expect("tempdir");
        let (a, b) = (folder.path().join("a.yaml"), folder.path().join("b.yaml"));
        std::fs::write(&a, target("one") + &target("two")).expect("write");
        std::fs::write(&b, target("three")).expect("write");
        let mut cache = ManifestCache::default();

        assert_eq!(
            names(&load_cached(folder.path(), &mut cache)),
            ["one", "three", "two"]
        );
        let again = load_cached(folder.path(), &mut cache);
        assert!(again.changed.is_empty());
        assert_eq!(again.resources.targets.len(), 3);

        // What a file defined before counts too: `two`, gone from it, may be defined elsewhere.
        crate::fsutil::write_replace(&a, (target("one") + &target("four")).as_bytes())
            .expect("write");
        assert_eq!(
            names(&load_cached(folder.path(), &mut cache)),
            ["four", "one", "two"]
        );

        std::fs::remove_file(&b).expect("remove");
        let after = load_cached(folder.path(), &mut cache);
        assert_eq!(names(&after), ["three"]);
        assert_eq!(after.resources.targets.len(), 2);
    }
}
