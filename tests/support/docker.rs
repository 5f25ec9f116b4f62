//! Debian's Docker for tests: a dockerd of the test's own, which builds the repository's
//! Dockerfile as users do and runs what it built.
//!
//! No registry is reachable here, so the Dockerfile's base, `debian:bookworm-slim`, is made from
//! Debian's archive (mmdebstrap, minbase) and imported under that name; the root file system is
//! cached in `~/.cache/discus/` (some 110 s to make). The Rust stage is skipped: the image takes
//! the discus binary of this test run (`--build-arg DISCUS_BINARY=prebuilt`), as `make image` does.
//!
//! The daemon runs in a host of its own (tests/support/sandbox.rs: its mounts and every process
//! it starts die with it) but on the machine's network, which its builds need for Debian's archive.
//! It is told to leave that network alone: no bridge, no iptables rules, no IP forwarding;
//! containers get `--network none` and a cable to a test LAN (tests/support/network.rs). Its
//! runtime is tools/runc-wrapper, without which privileged containers fail on these machines. Its
//! data root (image layers, build cache) is kept in `~/.cache/discus/docker`, one daemon at a
//! time (a lock), so a warm run rebuilds only what changed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::sandbox::Sandbox;
use std::time::{Duration, Instant};

/// The Debian client: it speaks BuildKit (the newer client some machines have on PATH lacks
/// buildx).
const DOCKER: &str = "/usr/bin/docker";
/// What the Dockerfile's `FROM` names.
pub const BASE_IMAGE: &str = "debian:bookworm-slim";
/// The name tests give the image they build.
pub const IMAGE: &str = concat!("discus-test/discus:", env!("CARGO_PKG_VERSION"));
/// The pod sandbox image the test node's containerd uses (tests/tools/pause.c).
pub const PAUSE_IMAGE: &str = "discus-test/pause:1";
/// The cgroup under which the containers run (removed afterwards).
const CGROUP: &str = "discus-test-docker";

pub struct Docker {
    /// dockerd (behind the nsenter that started it).
    daemon: Child,
    sandbox: Option<Sandbox>,
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

/// The test caches: `$DISCUS_CACHE`, else `~/.cache/discus`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DISCUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/discus")
        })
}

impl Docker {
    /// Starts a dockerd and waits until it answers; `debian:bookworm-slim` is there.
    pub fn start() -> Self {
        let root = cache_dir().join("docker");
        std::fs::create_dir_all(&root).expect("docker cache dir");
        let lock = lock(&root.join("lock"));
        // Short: unix socket paths under the exec root have a length limit.
        let dir = tempfile::Builder::new()
            .prefix("dk-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let sandbox = Sandbox::on_host_network();
        // A /proc of its PID namespace (BuildKit's runc reads its children's there), and tmpfs
        // over what its containerd writes wherever it is told (/run/containerd/s for the shims'
        // sockets, /opt/containerd).
        sandbox.must(&["mount", "-t", "proc", "proc", "/proc"]);
        for path in ["/run", "/opt"] {
            sandbox.must(&["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path]);
        }
        let wrapper = super::control_plane::bin_dir().join("runc-wrapper");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("log");
        let daemon = sandbox
            .command("dockerd")
            .arg(format!("--data-root={}", root.join("data").display()))
            .arg(format!("--exec-root={}", dir.path().join("x").display()))
            .arg(format!(
                "--pidfile={}",
                dir.path().join("dockerd.pid").display()
            ))
            .arg(format!(
                "--host=unix://{}",
                dir.path().join("d.sock").display()
            ))
            .args(["--bridge=none", "--iptables=false", "--ip-forward=false"])
            .args(["--ip-masq=false", "--userland-proxy=false"])
            .args(["--storage-driver=overlay2", "--log-level=warn"])
            .arg(format!("--cgroup-parent=/{CGROUP}"))
            .arg(format!("--add-runtime=discus-runc={}", wrapper.display()))
            .arg("--default-runtime=discus-runc")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian's docker.io) starts");
        let docker = Self {
            daemon,
            sandbox: Some(sandbox),
            dir,
            _lock: lock,
        };
        docker.wait_until_up();
        docker.ensure_base_image();
        docker
    }

    /// `docker` talking to this daemon, with BuildKit.
    pub fn docker(&self) -> Command {
        let mut command = Command::new(DOCKER);
        command
            .env("DOCKER_HOST", format!("unix://{}", self.socket().display()))
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", self.dir.path().join("client"));
        command
    }

    /// Runs `docker ARGS` and returns its standard output, or fails with what it said.
    pub fn must(&self, args: &[&str]) -> String {
        let output = self.docker().args(args).output().expect("docker runs");
        assert!(
            output.status.success(),
            "docker {args:?} failed: {}{}\n--- dockerd:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("d.sock")
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let up = self
                .docker()
                .args(["version", "--format", "{{.Server.Version}}"])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("dockerd did not answer within 60 s:\n{}", self.log());
    }

    /// Imports Debian's minbase as `debian:bookworm-slim`, unless the daemon has it.
    fn ensure_base_image(&self) {
        let present = self
            .docker()
            .args(["image", "inspect", BASE_IMAGE])
            .output()
            .is_ok_and(|o| o.status.success());
        if present {
            return;
        }
        let tarball = debian_minbase();
        self.must(&[
            "import",
            "--change",
            "CMD [\"bash\"]",
            &tarball.display().to_string(),
            BASE_IMAGE,
        ]);
    }

    /// Builds the repository's Dockerfile around `binary` (`DISCUS_BINARY=prebuilt`), tagged
    /// `tag`; returns how long the build took.
    pub fn build_discus(&self, binary: &Path, tag: &str) -> Duration {
        let context = tempfile::tempdir().expect("context");
        // The tests' binary carries debug information the image does not need.
        let status = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(context.path().join("discus"))
            .status()
            .expect("objcopy (binutils) runs");
        assert!(status.success(), "objcopy --strip-debug failed");
        let started = Instant::now();
        let dockerfile = super::repo().join("Dockerfile");
        self.must(&[
            "build",
            "--network=host",
            "--file",
            &dockerfile.display().to_string(),
            "--build-arg",
            "DISCUS_BINARY=prebuilt",
            "--build-arg",
            concat!("VERSION=", env!("CARGO_PKG_VERSION")),
            "--tag",
            tag,
            &context.path().display().to_string(),
        ]);
        let took = started.elapsed();
        // The cache keeps the base and the packages' layer; earlier builds of discus go.
        self.must(&["image", "prune", "--force"]);
        self.must(&["builder", "prune", "--force", "--filter", "until=168h"]);
        took
    }

    /// Builds the pod sandbox ("pause") image from tests/tools/pause.c, static, FROM scratch.
    pub fn build_pause(&self) {
        let context = tempfile::tempdir().expect("context");
        let status = Command::new("cc")
            .args(["-static", "-Os", "-o"])
            .arg(context.path().join("pause"))
            .arg(super::repo().join("tests/tools/pause.c"))
            .status()
            .expect("cc runs");
        assert!(status.success(), "building pause needs gcc and libc6-dev");
        let mut build = self
            .docker()
            .args(["build", "--file", "-", "--tag", PAUSE_IMAGE])
            .arg(context.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker build");
        build
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n")
            .expect("Dockerfile");
        let output = build.wait_with_output().expect("docker build");
        assert!(
            output.status.success(),
            "building the pause image failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `docker save` of `images` into one tarball.
    pub fn save(&self, images: &[&str], out: &Path) {
        let mut args = vec!["save", "--output"];
        let out = out.display().to_string();
        args.push(&out);
        args.extend_from_slice(images);
        self.must(&args);
    }

    /// The host PID of a process of a running container (dockerd, in a PID namespace of its
    /// own, numbers them otherwise), from the container's cgroup.
    pub fn pid_of(&self, container: &str) -> u32 {
        let id = self.must(&["inspect", "--format", "{{.Id}}", container]);
        let procs = format!("/sys/fs/cgroup/pids/{CGROUP}/{}/cgroup.procs", id.trim());
        std::fs::read_to_string(&procs)
            .unwrap_or_else(|e| panic!("{procs}: {e}"))
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no process in {procs}"))
    }

    /// dockerd's PID, as the host sees it (the nsenter in front of it forked it).
    fn daemon_pid(&self) -> Option<u32> {
        super::children(self.daemon.id()).first().copied()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // A clean stop keeps the cached data root consistent; then the namespaces go, and every
        // container with them.
        if let Some(pid) = self.daemon_pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(self.daemon.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        drop(self.sandbox.take());
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && Path::new("/sys/fs/cgroup/pids").join(CGROUP).exists() {
            remove_cgroups(CGROUP);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An exclusive lock on `path`, waited for: one dockerd per data root.
fn lock(path: &Path) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("lock file");
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    file
}

/// Debian 12's minbase root file system as a tarball (mmdebstrap), made once and cached.
pub fn debian_minbase() -> PathBuf {
    let path = cache_dir().join("debian-bookworm-minbase.tar");
    if path.exists() {
        return path;
    }
    let partial = cache_dir().join(format!(
        "debian-bookworm-minbase.{}.tar",
        std::process::id()
    ));
    let started = Instant::now();
    let output = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--format=tar", "--quiet", "bookworm"])
        .arg(&partial)
        .arg("http://deb.debian.org/debian")
        .output()
        .expect("mmdebstrap (Debian's mmdebstrap) runs");
    assert!(
        output.status.success(),
        "mmdebstrap failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&partial, &path).expect("rename");
    println!(
        "made Debian's minbase with mmdebstrap in {:.0?}",
        started.elapsed()
    );
    path
}

/// Removes a cgroup a test made under every v1 hierarchy, deepest first; a cgroup that still
/// holds processes stays (rmdir refuses it).
pub fn remove_cgroups(name: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        remove_tree(&hierarchy.path().join(name));
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&child.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
