//! A read-only LIO target made by hand in configfs the way an administrator (or targetcli)
//! makes it, and the settings in which two targets differ: what the LIO benchmarks compare
//! discus against (benches/lio.rs), and what tests/lio.rs checks discus's targets against, so
//! that a setting discus makes and an administrator would not shows.

use std::collections::BTreeSet;

use super::lio_vm::LioVm;

/// A read-only target made by hand in configfs: targetcli's choices (buffered fileio, 512-byte
/// blocks, CHAP as `client` / `client-secret`, an ACL per initiator, its LUN mapped
/// write-protected) and the two hardening switches discus adds to them (no discovery without an
/// ACL, `prod_mode_write_protect`).
pub struct ByHand<'a> {
    pub name: &'a str,
    pub iqn: &'a str,
    /// `discus:<namespace>/<name>` marks a target as discus's (a sync may then remove it): the
    /// baseline of a cold sync writes what discus writes; a target meant to stay beside discus's
    /// has an alias of its own.
    pub alias: &'a str,
    pub file: &'a str,
    pub size: u64,
    pub serial: &'a str,
    pub initiators: &'a [&'a str],
}

/// What a script of `ByHand::script`s starts with.
pub const PRELUDE: &str = "set -e\ncd /sys/kernel/config/target\nmkdir -p iscsi core/fileio_3261\n";

impl ByHand<'_> {
    /// Makes it in the guest's configfs, through a script on the shared folder.
    pub fn make(&self, vm: &LioVm) {
        let script = format!("{PRELUDE}{}", self.script());
        std::fs::write(vm.share().join(format!("{}.sh", self.name)), script).expect("script");
        vm.must(&format!("sh /host/{}.sh", self.name));
    }

    /// Its configfs writes, from `/sys/kernel/config/target` with `core/fileio_3261` made.
    pub fn script(&self) -> String {
        let Self {
            name,
            iqn,
            alias,
            file,
            size,
            serial,
            ..
        } = self;
        let so = format!("core/fileio_3261/{name}");
        let tpg = format!("iscsi/{iqn}/tpgt_1");
        let mut script = format!(
            "mkdir {so}\necho -n fd_dev_name={file},fd_dev_size={size},fd_buffered_io=1 > {so}/control\n\
             echo -n {file} > {so}/udev_path\necho -n 1 > {so}/enable\n\
             echo -n {serial} > {so}/wwn/vpd_unit_serial\necho -n 512 > {so}/attrib/block_size\n\
             mkdir iscsi/{iqn}\nmkdir {tpg}\necho -n {alias} > {tpg}/param/TargetAlias\n"
        );
        for (attribute, value) in [
            ("generate_node_acls", 0),
            ("authentication", 1),
            ("demo_mode_write_protect", 1),
            ("prod_mode_write_protect", 1),
            ("cache_dynamic_acls", 0),
            ("demo_mode_discovery", 0),
        ] {
            script.push_str(&format!("echo -n {value} > {tpg}/attrib/{attribute}\n"));
        }
        script.push_str(&format!(
            "mkdir -p {tpg}/np/0.0.0.0:3260\nmkdir {tpg}/lun/lun_0\n\
             ln -s /sys/kernel/config/target/{so} {tpg}/lun/lun_0/discus\n"
        ));
        for initiator in self.initiators {
            let acl = format!("{tpg}/acls/{initiator}");
            script.push_str(&format!(
                "mkdir {acl}\necho -n client > {acl}/auth/userid\necho -n client-secret > {acl}/auth/password\n\
                 mkdir {acl}/lun_0\nln -s /sys/kernel/config/target/{tpg}/lun/lun_0 {acl}/lun_0/lun\n\
                 echo -n 1 > {acl}/lun_0/write_protect\n"
            ));
        }
        script.push_str(&format!("echo -n 1 > {tpg}/enable\n"));
        script
    }
}

/// The configfs folder of the storage object behind LUN 0 of target `iqn`: the one symbolic
/// link among the LUN's entries.
pub fn backstore(vm: &LioVm, iqn: &str) -> String {
    let lun = format!("/sys/kernel/config/target/iscsi/{iqn}/tpgt_1/lun/lun_0");
    let found = vm.must(&format!(
        "for entry in {lun}/*; do [ -L \"$entry\" ] && readlink -f \"$entry\"; done; true"
    ));
    let lines: Vec<&str> = found.lines().collect();
    match lines.as_slice() {
        [one] => (*one).to_owned(),
        _ => panic!("{iqn}: not one storage object behind LUN 0: {found:?}"),
    }
}

/// Every TPG attribute and iSCSI parameter (`attrib/…:value`, `param/…:value`), every ACL's
/// attributes and the write protection of its LUN 0 (`acls/…:value`), and every attribute of
/// LUN 0's storage object (`storage/attrib/…:value`) in which the targets `ours` and `theirs` in
/// the guest differ.
pub fn settings_that_differ(vm: &LioVm, ours: &str, theirs: &str) -> BTreeSet<String> {
    let settings = |iqn: &str| -> BTreeSet<String> {
        let tpg = format!("/sys/kernel/config/target/iscsi/{iqn}/tpgt_1");
        let listing = vm.must(&format!(
            // Some attributes cannot be read (grep says so and goes on); the folders must be.
            // Never auth/: it holds the passwords.
            "cd {tpg} && {{ grep -r . attrib param acls/*/attrib acls/*/lun_0/write_protect \
             2>/dev/null; true; }} && cd {} && grep -r . attrib 2>/dev/null | sed 's|^|storage/|'",
            backstore(vm, iqn)
        ));
        let settings: BTreeSet<String> = listing.lines().map(str::to_owned).collect();
        for kind in ["attrib/", "param/", "acls/", "storage/attrib/"] {
            assert!(
                settings.iter().any(|s| s.starts_with(kind)),
                "{iqn}: no {kind} settings read: {listing}"
            );
        }
        settings
    };
    let (a, b) = (settings(ours), settings(theirs));
    a.symmetric_difference(&b).cloned().collect()
}
