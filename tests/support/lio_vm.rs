//! Real kernel LIO for tests, on machines whose own kernel has none: Debian's kernel booted under
//! qemu (TCG) with the target modules, discus inside, initiators on the host.
//!
//! - The kernel package is fetched with `apt-get download` and unpacked once, into
//!   `~/.cache/discus/lio-kernel-<version>/` (never relied on: it is rebuilt when absent).
//! - The initramfs is a static busybox, the modules LIO needs (`crc32c_generic` included, or every
//!   login fails), 9p to share a folder with the host, and the discus binary of this test run with
//!   the libraries it links. The guest can be a client too: open-iscsi's initiator modules, and
//!   `iscsid` and `iscsiadm` from Debian's package (unpacked once into
//!   `~/.cache/discus/open-iscsi-<version>/`) with the libraries they link. tgt's `tgtd` and
//!   `tgtadm` (the host's) let a second agent serve through tgt beside LIO.
//! - The guest listens on 0.0.0.0:3260; the host reaches it through a forward on 127.0.0.1.
//! - The host hands manifests and images over the shared folder and runs commands in the guest
//!   through it (`inbox/`, `outbox/`); discus writes its status into it.
//!
//! One boot serves a group of scenarios; dropping the VM stops qemu, which also dies with the test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The modules LIO, virtio networking and 9p need, in load order.
const MODULES: &[&str] = &[
    "crc32c_generic",
    "configfs",
    "scsi_common",
    "crct10dif_common",
    "crct10dif_generic",
    "crc-t10dif",
    "target_core_mod",
    "target_core_file",
    "iscsi_target_mod",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    // The initiator side (open-iscsi), disks and ISO 9660.
    "scsi_mod",
    "crc64",
    "crc64_rocksoft_generic",
    "crc64-rocksoft",
    "t10-pi",
    "sd_mod",
    "scsi_transport_iscsi",
    "libiscsi",
    "libiscsi_tcp",
    "iscsi_tcp",
    "cdrom",
    "isofs",
];

/// The packages of open-iscsi's `iscsid` and `iscsiadm` that a Debian machine lacks.
const OPEN_ISCSI_PACKAGES: &[&str] = &["open-iscsi", "libopeniscsiusr", "libisns0"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/local/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
mount -t configfs none /sys/kernel/config
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mkdir -p /host /var/lib/discus /tmp /run/lock/iscsi /etc/iscsi/nodes
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /host
ln -s /host/status /var/lib/discus/status
mkdir -p /run
ln -s /run /var/run
echo ready > /host/ready
# Commands from the host: inbox/<n> is run with sh, its output and exit code go to outbox/.
while true; do
  for job in /host/inbox/*; do
    [ -e "$job" ] || continue
    n=$(basename "$job")
    mv "$job" /tmp/job-$n
    sh /tmp/job-$n > /host/outbox/$n.out 2>&1
    echo $? > /host/outbox/$n.rc.part
    mv /host/outbox/$n.rc.part /host/outbox/$n.rc
  done
  sleep 0.05
done
"#;

pub struct LioVm {
    qemu: Option<Qemu>,
    dir: tempfile::TempDir,
    /// The host port forwarded to the guest's 3260.
    pub port: u16,
    /// The host port forwarded to the guest's 8090 (a boot endpoint there).
    pub boot_port: u16,
    jobs: AtomicU64,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed (.ci/run installs it): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Debian's current kernel, unpacked from its package: what guests of the tests boot.
pub struct Kernel {
    /// The kernel's release, e.g. `6.1.0-57-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The folder with `<module>.ko` for every module asked for.
    pub modules: PathBuf,
}

/// Debian's current kernel package (what linux-image-amd64 depends on), unpacked into
/// `~/.cache/discus/lio-kernel-<release>/` with at least the `wanted` modules. One cache serves
/// every guest of the tests (LIO here, iBFT in netboot.rs): a cache that lacks a module gets it
/// added, one file at a time (each written aside, then renamed), and keeps what it had. A new
/// cache is built aside (`….partial-<pid>`) and renamed into place; never relied on: it is
/// rebuilt when absent.
pub fn kernel(wanted: &[&str]) -> Kernel {
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .expect("apt-cache");
    let package = String::from_utf8_lossy(&depends.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_owned))
        .expect("linux-image-amd64 depends on a kernel package");
    let release = package.trim_start_matches("linux-image-").to_owned();
    let cache = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".cache/discus")
        .join(format!("lio-kernel-{release}"));
    let kernel = Kernel {
        vmlinuz: cache.join("vmlinuz"),
        modules: cache.join("modules"),
        release: release.clone(),
    };
    let missing = |kernel: &Kernel| -> Vec<String> {
        wanted
            .iter()
            .filter(|m| !kernel.modules.join(format!("{m}.ko")).exists())
            .map(|m| (*m).to_owned())
            .collect()
    };
    if kernel.vmlinuz.exists() && missing(&kernel).is_empty() {
        return kernel;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let download = Command::new("apt-get")
        .args(["download", &package])
        .current_dir(work.path())
        .output()
        .expect("apt-get download");
    assert!(
        download.status.success(),
        "apt-get download {package}: {}",
        String::from_utf8_lossy(&download.stderr)
    );
    let deb = std::fs::read_dir(work.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the .deb");
    let root = work.path().join("root");
    run(
        "dpkg-deb",
        &[
            "-x",
            &deb.display().to_string(),
            &root.display().to_string(),
        ],
    );
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let tree = root.join(format!("lib/modules/{release}/kernel"));
    let module = |name: &str| {
        find(&tree, &format!("{name}.ko")).unwrap_or_else(|| panic!("{name}.ko in {package}"))
    };
    if !cache.exists() {
        let partial = cache.with_file_name(format!(
            "lio-kernel-{release}.partial-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(partial.join("modules")).expect("cache");
        std::fs::copy(&vmlinuz, partial.join("vmlinuz")).expect("vmlinuz");
        for name in wanted {
            std::fs::copy(module(name), partial.join(format!("modules/{name}.ko")))
                .expect("module");
        }
        // Another test process may have won the race: its cache is as good, and gets what this
        // one lacks below.
        if std::fs::rename(&partial, &cache).is_ok() {
            return kernel;
        }
        let _ = std::fs::remove_dir_all(&partial);
    }
    std::fs::create_dir_all(&kernel.modules).expect("cache");
    let place = |from: &Path, to: &Path| {
        let aside = to.with_file_name(format!(
            ".{}.{}",
            to.file_name().expect("name").to_string_lossy(),
            std::process::id()
        ));
        std::fs::copy(from, &aside).expect("cache");
        std::fs::rename(&aside, to).expect("cache");
    };
    if !kernel.vmlinuz.exists() {
        place(&vmlinuz, &kernel.vmlinuz);
    }
    for name in missing(&kernel) {
        place(&module(&name), &kernel.modules.join(format!("{name}.ko")));
    }
    kernel
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// The initramfs: busybox, init, modules, discus and its libraries, as an uncompressed cpio.
fn initramfs(dir: &Path, modules: &Path, discus: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    for sub in [
        "bin",
        "modules",
        "usr/local/bin",
        "lib/x86_64-linux-gnu",
        "lib64",
        "proc",
        "sys",
        "dev",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static must be installed");
    std::fs::write(root.join("init"), INIT).expect("init");
    std::fs::write(root.join("modules.order"), MODULES.join("\n")).expect("order");
    for module in MODULES {
        std::fs::copy(
            modules.join(format!("{module}.ko")),
            root.join(format!("modules/{module}.ko")),
        )
        .expect("module");
    }
    run(
        "objcopy",
        &[
            "--strip-debug",
            &discus.display().to_string(),
            &root.join("usr/local/bin/discus").display().to_string(),
        ],
    );
    for library in ["libgcc_s.so.1", "libm.so.6", "libc.so.6"] {
        std::fs::copy(
            Path::new("/lib/x86_64-linux-gnu").join(library),
            root.join("lib/x86_64-linux-gnu").join(library),
        )
        .expect("library");
    }
    std::fs::copy(
        "/lib64/ld-linux-x86-64.so.2",
        root.join("lib64/ld-linux-x86-64.so.2"),
    )
    .expect("loader");
    install_open_iscsi(&root);
    install_tgt(&root);
    for file in ["init", "bin/busybox", "usr/local/bin/discus"] {
        let mut permissions = std::fs::metadata(root.join(file))
            .expect("file")
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(root.join(file), permissions).expect("chmod");
    }
    let image = dir.join("initrd.cpio");
    cpio(&root, &image);
    image
}

/// `iscsid`, `iscsiadm`, their configuration and every library they link that the guest lacks.
fn install_open_iscsi(root: &Path) {
    let unpacked = unpacked_packages(OPEN_ISCSI_PACKAGES);
    std::fs::create_dir_all(root.join("sbin")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc/iscsi")).expect("mkdir");
    std::fs::copy(
        unpacked.join("etc/iscsi/iscsid.conf"),
        root.join("etc/iscsi/iscsid.conf"),
    )
    .expect("iscsid.conf");
    // iscsid serves only root, whom it knows by name.
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    let libraries = unpacked.join("usr/lib/x86_64-linux-gnu");
    for program in ["iscsid", "iscsiadm"] {
        install_program(root, &unpacked.join("sbin").join(program), &libraries);
    }
}

/// tgt's daemon and admin tool, from the host (where .ci/run installs tgt): a second backend in
/// the same guest.
fn install_tgt(root: &Path) {
    for program in ["/usr/sbin/tgtd", "/usr/sbin/tgtadm"] {
        install_program(root, Path::new(program), Path::new("/nonexistent"));
    }
}

/// A program into the guest's `/sbin`, with every library it links that the guest lacks
/// (`libraries` searched first).
fn install_program(root: &Path, binary: &Path, libraries: &Path) {
    let to = root
        .join("sbin")
        .join(binary.file_name().expect("a program"));
    std::fs::copy(binary, &to).expect("program");
    let mut permissions = std::fs::metadata(binary).expect("program").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&to, permissions).expect("chmod");
    for (name, path) in linked_libraries(binary, libraries) {
        let to = root.join("lib/x86_64-linux-gnu").join(name);
        if !to.exists() {
            std::fs::copy(&path, &to).expect("library");
        }
    }
}

/// The libraries a program links, by the name the loader looks for and where it found them
/// (the loader's own `--list`; `extra` searched first).
fn linked_libraries(program: &Path, extra: &Path) -> Vec<(String, PathBuf)> {
    let output = Command::new("/lib64/ld-linux-x86-64.so.2")
        .arg("--list")
        .arg(program)
        .env("LD_LIBRARY_PATH", extra)
        .output()
        .expect("the loader lists libraries");
    assert!(
        output.status.success(),
        "ld.so --list {}",
        program.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(" => ")?;
            let path = rest.split_whitespace().next()?;
            Some((name.to_owned(), PathBuf::from(path)))
        })
        .collect()
}

/// Debian packages unpacked (not installed) into one folder, once: `~/.cache/discus/
/// <first package>-<its version>/`, built aside and renamed into place; never relied on.
pub fn unpacked_packages(packages: &[&str]) -> PathBuf {
    let version = Command::new("apt-cache")
        .args(["show", "--no-all-versions", packages[0]])
        .output()
        .expect("apt-cache");
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_owned))
        .unwrap_or_else(|| panic!("apt-cache knows no {}", packages[0]));
    let cache = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".cache/discus")
        .join(format!(
            "{}-{}",
            packages[0],
            version.replace([':', '/'], "_")
        ));
    if cache.exists() {
        return cache;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let download = Command::new("apt-get")
        .arg("download")
        .args(packages)
        .current_dir(work.path())
        .output()
        .expect("apt-get download");
    assert!(
        download.status.success(),
        "apt-get download {packages:?}: {}",
        String::from_utf8_lossy(&download.stderr)
    );
    let partial = work.path().join("root");
    for deb in std::fs::read_dir(work.path())
        .expect("dir")
        .filter_map(Result::ok)
    {
        let deb = deb.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(
                "dpkg-deb",
                &[
                    "-x",
                    &deb.display().to_string(),
                    &partial.display().to_string(),
                ],
            );
        }
    }
    let name = cache
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let aside = cache.with_file_name(format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&aside);
    run(
        "cp",
        &[
            "-a",
            &partial.display().to_string(),
            &aside.display().to_string(),
        ],
    );
    // Another test process may have won the race: its folder is as good.
    if std::fs::rename(&aside, &cache).is_err() {
        let _ = std::fs::remove_dir_all(&aside);
    }
    cache
}

/// Packs the folder `root` into `image`, an uncompressed newc cpio archive (an initramfs).
pub fn cpio(root: &Path, image: &Path) {
    let mut files = Vec::new();
    collect(root, root, &mut files);
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet", "-F"])
        .arg(image)
        .current_dir(root)
        .stdin(Stdio::piped())
        .spawn()
        .expect("cpio must be installed");
    {
        use std::io::Write;
        let mut stdin = cpio.stdin.take().expect("stdin");
        for file in &files {
            writeln!(stdin, "{file}").expect("list");
        }
    }
    assert!(cpio.wait().expect("cpio").success());
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("dir").filter_map(Result::ok) {
        let path = entry.path();
        if let Ok(relative) = path.strip_prefix(root) {
            files.push(relative.display().to_string());
        }
        if path.is_dir() {
            collect(root, &path, files);
        }
    }
}

impl LioVm {
    /// Boots a guest with the discus of this test run, and waits until it is ready.
    pub fn boot() -> Self {
        let Kernel {
            vmlinuz: kernel,
            modules,
            ..
        } = kernel(MODULES);
        let dir = tempfile::Builder::new()
            .prefix("discus-lio-vm-")
            .tempdir()
            .expect("tempdir");
        let initrd = initramfs(
            dir.path(),
            &modules,
            Path::new(env!("CARGO_BIN_EXE_discus")),
        );
        // Both held until both are known: two different ports.
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("port"))
            .collect();
        let port_of = |l: &TcpListener| l.local_addr().expect("addr").port();
        let (port, boot_port) = (port_of(&listeners[0]), port_of(&listeners[1]));
        drop(listeners);
        let mut vm = Self {
            qemu: None,
            dir,
            port,
            boot_port,
            jobs: AtomicU64::new(0),
            kernel,
            initrd,
        };
        vm.start();
        vm
    }

    /// The folder shared with the guest, seen from the host (the guest sees it as /host).
    pub fn share(&self) -> PathBuf {
        self.dir.path().join("share")
    }

    fn start(&mut self) {
        let share = self.share();
        for sub in ["manifests", "images", "status", "inbox", "outbox"] {
            std::fs::create_dir_all(share.join(sub)).expect("share");
        }
        let _ = std::fs::remove_file(share.join("ready"));
        let console = std::fs::File::create(self.dir.path().join("console.log")).expect("console");
        let mut command = Command::new("setpriv");
        command
            .args([
                "--pdeathsig",
                "KILL",
                "--",
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-smp",
                "2",
                "-m",
                "1536",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args([
                "-append",
                "console=ttyS0 loglevel=5 panic=-1",
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .args([
                "-netdev",
                &format!(
                    "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:3260,hostfwd=tcp:127.0.0.1:{}-:8090",
                    self.port, self.boot_port
                ),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args([
                "-virtfs",
                &format!(
                    "local,path={},mount_tag=host,security_model=none,id=host",
                    share.display()
                ),
            ])
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(
                std::fs::File::create(self.dir.path().join("qemu.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            );
        self.qemu = Some(Qemu::start(command));
        let start = Instant::now();
        while !share.join("ready").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "the guest did not boot:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("guest booted in {:.1} s", start.elapsed().as_secs_f64());
    }

    /// Stops the guest and boots it again: configfs starts empty, as after a power cut.
    pub fn reboot(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            qemu.stop();
        }
        self.start();
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Runs a shell command in the guest and returns (exit code, output).
    pub fn sh(&self, command: &str) -> (i32, String) {
        let n = self.jobs.fetch_add(1, Ordering::SeqCst);
        let share = self.share();
        let part = share.join(format!("inbox/.{n}"));
        std::fs::write(&part, command).expect("job");
        std::fs::rename(&part, share.join(format!("inbox/{n}"))).expect("job");
        let rc = share.join(format!("outbox/{n}.rc"));
        let start = Instant::now();
        while !rc.exists() {
            if let Some(gone) = self.qemu_gone() {
                panic!(
                    "qemu is gone ({gone}) while the guest ran {command:?}:\n{}\nqemu: {}",
                    self.console(),
                    std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "the guest did not run {command:?} (qemu runs, in state {}):\n{}",
                self.qemu_state(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let code = std::fs::read_to_string(&rc)
            .expect("rc")
            .trim()
            .parse()
            .unwrap_or(-1);
        let output =
            std::fs::read_to_string(share.join(format!("outbox/{n}.out"))).unwrap_or_default();
        // Shown when a test fails (or with --nocapture): where the guest's time went.
        let shown: String = command.chars().take(100).collect();
        eprintln!(
            "guest {:>6.1} s  rc {code}  {shown}",
            start.elapsed().as_secs_f64()
        );
        (code, output)
    }

    /// qemu's process state as /proc says it (`R`, `S`, `Z`…) and its CPU time in ticks.
    fn qemu_state(&self) -> String {
        let Some(pid) = self.qemu.as_ref().map(|q| q.pid) else {
            return "not started".into();
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or(Vec::new(), |(_, rest)| rest.split(' ').collect());
        format!(
            "{} utime {} stime {}",
            fields.first().unwrap_or(&"?"),
            fields.get(11).unwrap_or(&"?"),
            fields.get(12).unwrap_or(&"?")
        )
    }

    /// Why qemu is no longer running, if it is not.
    fn qemu_gone(&self) -> Option<String> {
        let exited = self.qemu.as_ref().is_none_or(|q| q.keeper.is_finished());
        exited.then(|| "exited".to_owned())
    }

    /// Runs a command in the guest and fails the test if it fails.
    pub fn must(&self, command: &str) -> String {
        let (code, output) = self.sh(command);
        assert_eq!(code, 0, "{command} failed in the guest:\n{output}");
        output
    }

    /// Writes the manifest `name` where discus in the guest reads them (`/host/manifests`), whole.
    pub fn manifest(&self, name: &str, yaml: &str) {
        let path = self.share().join("manifests").join(name);
        let part = path.with_extension("part");
        std::fs::write(&part, yaml).expect("manifest");
        std::fs::rename(part, path).expect("manifest");
    }

    /// The status discus in the guest wrote for a resource of namespace `lab` (`null` if none).
    pub fn status(&self, kind: &str, name: &str) -> serde_json::Value {
        std::fs::read(self.share().join(format!("status/{kind}/lab/{name}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// A condition of that status: (status, message), empty when absent.
    pub fn condition(&self, kind: &str, name: &str, condition: &str) -> (String, String) {
        let status = self.status(kind, name);
        let found = status
            .pointer("/status/conditions")
            .and_then(serde_json::Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == condition).cloned())
            .unwrap_or_default();
        (
            found["status"].as_str().unwrap_or("").to_owned(),
            found["message"].as_str().unwrap_or("").to_owned(),
        )
    }

    /// The iSCSI portal the host reaches the guest's target at.
    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for LioVm {
    fn drop(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            qemu.stop();
        }
    }
}

/// qemu, started and reaped by a thread of its own that lives exactly as long as qemu does.
/// `setpriv --pdeathsig` ties qemu to the *thread* that started it, not the process: started
/// from a thread that ends first — a tokio blocking-pool thread ends after 10 s idle — qemu would
/// be killed with it, silently, in the middle of a test (seen under load).
///
/// The keeper also kills it when asked: only it holds the child, so no signal can go to a PID
/// already reaped and reused.
pub struct Qemu {
    pid: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    keeper: std::thread::JoinHandle<()>,
}

impl Qemu {
    /// Spawns `command` (qemu, or an `nsenter` that runs it) from a keeper thread.
    pub fn start(mut command: Command) -> Self {
        let (started, pid) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let keeper = std::thread::spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = started.send(Ok(child.id()));
                loop {
                    if !matches!(child.try_wait(), Ok(None)) {
                        return;
                    }
                    if stopping.load(Ordering::SeqCst) {
                        // An nsenter in front of qemu: qemu first (the nsenter, not yet reaped,
                        // still holds it as its child), then the nsenter.
                        for inner in super::children(child.id()) {
                            let _ = Command::new("kill")
                                .args(["-KILL", &inner.to_string()])
                                .stderr(Stdio::null())
                                .status();
                        }
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(error) => {
                let _ = started.send(Err(error));
            }
        });
        let pid = pid
            .recv()
            .expect("the keeper thread says")
            .expect("qemu-system-x86 must be installed");
        Self { pid, stop, keeper }
    }

    /// qemu's PID, or that of the `nsenter` in front of it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process started has exited (and been reaped).
    pub fn exited(&self) -> bool {
        self.keeper.is_finished()
    }

    /// Kills qemu (and the `nsenter` in front of it, if any) and waits until it is reaped.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.keeper.join();
    }
}
