//! Crash anywhere: `discus serve` on tgt is killed (SIGKILL) at random moments while it applies
//! changes — targets and grants coming and going, passwords rotating, new images importing,
//! status being written — and started again. After each kill, before anything repairs it, tgtd
//! admits nobody a declaration did not name and no CHAP target is open; after the restart the
//! node converges to exactly what is declared: no orphan and no duplicate target, LUN, ACL or
//! account, no half-written image in the store, every declared credential working. A session on
//! a grant nothing touches lives through every kill.
//!
//! `DISCUS_CHAOS_KILLS` sets the number of kills (20 by default, what CI runs;
//! docs/reliability.md runs 100) and `DISCUS_CHAOS_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use support::chaos::Rng;
use support::manifests;
use support::serve_host::{Host, PORTAL, Tgtd, raw_image, sha256_file, tgtd};

const STEADY: &str = "iqn.2026-11.dev.discus:steady-client";
const CLIENTS: usize = 3;

/// What one round declares: which optional targets exist, their passwords, and whether a
/// freshly imported image is served.
#[derive(Clone, Debug, Default)]
struct Declared {
    /// Target index → the password of its grant's Secret.
    targets: BTreeMap<usize, String>,
    /// The round whose fresh image a target serves, if any.
    fresh: Option<u64>,
}

impl Declared {
    fn random(rng: &mut Rng, round: u64) -> Self {
        let mut targets = BTreeMap::new();
        for i in 0..CLIENTS {
            let password = format!("pw{i}-{:08}", rng.below(1_000_000));
            if rng.below(3) != 0 {
                targets.insert(i, password);
            }
        }
        let fresh = (rng.below(2) == 0).then_some(round);
        Self { targets, fresh }
    }

    /// Target IQN → the initiators it admits.
    fn acls(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut acls = BTreeMap::from([(iqn("steady"), BTreeSet::from([STEADY.to_owned()]))]);
        for i in self.targets.keys() {
            acls.insert(iqn(&format!("t{i}")), BTreeSet::from([client(*i)]));
        }
        if self.fresh.is_some() {
            acls.insert(iqn("fresh"), BTreeSet::from([client(0)]));
        }
        acls
    }

    /// Every CHAP username declared.
    fn accounts(&self) -> BTreeSet<String> {
        let mut accounts = BTreeSet::from(["steady".to_owned()]);
        accounts.extend(self.targets.keys().map(|i| format!("user{i}")));
        if self.fresh.is_some() {
            accounts.insert("fresh".to_owned());
        }
        accounts
    }
}

fn iqn(name: &str) -> String {
    format!("iqn.2026-11.dev.discus:{name}")
}

fn client(i: usize) -> String {
    format!("iqn.2026-11.dev.discus:client-{i}")
}

/// A CHAP target serving `image` as LUN 0, its grant for `initiator`, and the grant's Secret.
fn served(name: &str, image: &str, initiator: &str, user: &str, password: &str) -> [Value; 3] {
    [
        manifests::discus(
            "IscsiTarget",
            "lab",
            name,
            json!({"iqn": iqn(name), "luns": [{"lun": 0, "image": image}]}),
        ),
        manifests::discus(
            "InitiatorAccess",
            "lab",
            name,
            json!({
                "targetRef": {"name": name},
                "initiatorIqn": initiator,
                "chap": {"secretRef": {"name": format!("{name}-chap")}},
            }),
        ),
        manifests::secret(
            "lab",
            &format!("{name}-chap"),
            json!({"username": user, "password": password}),
        ),
    ]
}

/// Writes the round's manifest file whole (a rename), as a careful user would.
fn declare(host: &Host, declared: &Declared, base: &Value) {
    let mut objects = vec![base.clone()];
    objects.extend(served("steady", "base", STEADY, "steady", "steady-secret"));
    for (i, password) in &declared.targets {
        objects.extend(served(
            &format!("t{i}"),
            "base",
            &client(*i),
            &format!("user{i}"),
            password,
        ));
    }
    if let Some(round) = declared.fresh {
        let name = format!("fresh-{round}");
        let (path, digest) = host.image(&format!("{name}.raw"), 16 << 20);
        objects.push(raw_image(&name, &path, &digest));
        objects.extend(served("fresh", &name, &client(0), "fresh", "fresh-secret"));
    }
    let temporary = host.manifests.join(".lab.yaml.tmp");
    std::fs::write(&temporary, manifests::yaml(&objects)).expect("manifest");
    std::fs::rename(&temporary, host.manifests.join("lab.yaml")).expect("rename");
}

/// Right after a kill: nobody admitted that neither the old nor the new declaration names, and
/// every target that admits anyone has an account bound (tgt would let ACL'd initiators in
/// without CHAP otherwise).
fn never_wider(held: &Tgtd, before: &Declared, now: &Declared, round: u64) {
    let (old, new) = (before.acls(), now.acls());
    for (target, (admitted, accounts, _)) in &held.targets {
        let declared: BTreeSet<&String> = (old.get(target).into_iter().flatten())
            .chain(new.get(target).into_iter().flatten())
            .collect();
        for initiator in admitted {
            assert!(
                declared.contains(initiator),
                "round {round}: {target} admits {initiator}, which no declaration names"
            );
        }
        assert!(
            admitted.is_empty() || !accounts.is_empty(),
            "round {round}: {target} admits {admitted:?} with no account bound: CHAP is off"
        );
    }
}

/// After a restart: exactly what is declared, nothing twice, nothing left over.
fn exactly(host: &Host, held: &Tgtd, declared: &Declared, round: u64) {
    let wanted = declared.acls();
    let targets: BTreeMap<&String, &BTreeSet<String>> = held
        .targets
        .iter()
        .map(|(t, (acls, _, _))| (t, acls))
        .collect();
    let wanted_view: BTreeMap<&String, &BTreeSet<String>> = wanted.iter().collect();
    assert_eq!(targets, wanted_view, "round {round}: targets and ACLs");
    for (target, (_, accounts, luns)) in &held.targets {
        assert_eq!(
            *luns, 2,
            "round {round}: {target}: the controller and LUN 1, once"
        );
        assert_eq!(
            accounts.len(),
            1,
            "round {round}: {target}: one account bound: {accounts:?}"
        );
    }
    assert_eq!(
        held.accounts,
        declared.accounts(),
        "round {round}: accounts"
    );
    // The store: nothing half-written, every image what its name says.
    let data = host.sandbox.data_dir();
    let tmp: Vec<_> = std::fs::read_dir(data.join("tmp")).map_or(Vec::new(), |d| d.collect());
    assert!(tmp.is_empty(), "round {round}: work left in tmp/: {tmp:?}");
    for entry in std::fs::read_dir(data.join("images")).expect("images") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        assert_eq!(
            sha256_file(&path),
            name,
            "round {round}: {}",
            path.display()
        );
    }
    // Every declared credential works; a password no longer declared does not.
    for (i, password) in &declared.targets {
        let login = host.inquiry(
            &iqn(&format!("t{i}")),
            1,
            &client(*i),
            Some((&format!("user{i}"), password)),
        );
        assert!(login.is_ok(), "round {round}: client {i}: {login:?}");
        let stale = host.inquiry(
            &iqn(&format!("t{i}")),
            1,
            &client(*i),
            Some((&format!("user{i}"), "pw-not-declared")),
        );
        assert!(
            stale.is_err(),
            "round {round}: client {i} with a wrong password"
        );
    }
}

/// Waits for the moment to kill: most often after a random number of the pass's backend
/// operations (so that kills land inside the work), else after a random time (which lands in
/// start-up, imports and status writes too). A pass that ends first is killed as it ends.
fn strike(host: &Host, rng: &mut Rng) {
    let log = host.sandbox.path().join("serve.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    if rng.below(4) == 0 {
        std::thread::sleep(Duration::from_millis(rng.below(2_000)));
        return;
    }
    let ops = 1 + rng.below(12) as usize;
    while std::time::Instant::now() < deadline {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let done = text
            .lines()
            .filter(|l| l.contains("discus::sync::reconcile"))
            .count();
        if done >= ops || text.contains("sync pass done") {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn killed_anywhere_discus_never_admits_more_and_always_converges() {
    let (kills, mut rng) = support::chaos::plan("serve (tgt)", 20);
    let host = Host::new();
    let (base_path, base_digest) = host.image("base.raw", 1 << 20);
    let base = raw_image("base", &base_path, &base_digest);

    let mut before = Declared::default();
    declare(&host, &before, &base);
    let converged = host.once();
    assert_eq!(
        converged.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&converged.stderr)
    );
    // A session on the grant nothing touches, one request at a time; it must never drop.
    let mut steady = support::initiator::steady_session(
        host.sandbox.command("iscsi-perf"),
        STEADY,
        &format!("iscsi://steady%steady-secret@{PORTAL}/{}/1", iqn("steady")),
    );
    host.wait_for("the steady session", || {
        tgtd(&host).nexus.contains_key(STEADY)
    });
    let steady_nexus = tgtd(&host).nexus[STEADY].clone();

    // Kills that left the node between two declarations (the rest struck before or after work).
    let mut interrupted = 0;
    for round in 1..=kills {
        let now = Declared::random(&mut rng, round);
        declare(&host, &now, &base);
        let mut server = host.start();
        strike(&host, &mut rng);
        host.sandbox.kill(&mut server);
        let killed = tgtd(&host);
        never_wider(&killed, &before, &now, round);
        let admitted: BTreeMap<String, BTreeSet<String>> = (killed.targets.iter())
            .map(|(t, (acls, _, _))| (t.clone(), acls.clone()))
            .collect();
        if admitted != now.acls() && admitted != before.acls() {
            interrupted += 1;
        }

        let output = host.once();
        assert_eq!(
            output.status.code(),
            Some(0),
            "round {round} ({now:?}): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let held = tgtd(&host);
        exactly(&host, &held, &now, round);
        assert_eq!(
            held.nexus.get(STEADY),
            Some(&steady_nexus),
            "round {round}: the steady session"
        );
        assert!(
            steady.try_wait().expect("wait").is_none(),
            "round {round}: iscsi-perf ended"
        );
        before = now;
    }
    host.sandbox.kill(&mut steady);
    println!("chaos: {kills} kills survived, {interrupted} of them between two declarations");
}
