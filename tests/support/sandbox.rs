//! A host of its own for a test: new mount, network and PID namespaces, with a private
//! `/var/lib/discus` and `/run/tgtd`, and only a loopback interface. Servers started inside
//! (discus, tgtd) bind to that loopback, cannot collide with other tests, and die with the
//! sandbox: its PID 1 is a `sleep` held by the test process, and when that goes, the kernel ends
//! every process of the namespace.
//!
//! Commands run through `nsenter`, which forks the program into the sandbox's PID namespace (a
//! multi-threaded program cannot join one without a fork); `Sandbox::kill` ends the program
//! itself, not only the nsenter in front of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sandbox {
    holder: Child,
    /// The host PID of the sandbox's PID 1.
    pid: u32,
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Self::create(true)
    }

    /// Like `new`, but on the machine's network (for a daemon that needs Debian's archive).
    pub fn on_host_network() -> Self {
        Self::create(false)
    }

    fn create(private_network: bool) -> Self {
        for mount_point in ["/var/lib/discus", "/run/tgtd"] {
            std::fs::create_dir_all(mount_point).expect("mount point");
        }
        let dir = tempfile::Builder::new()
            .prefix("discus-sandbox-")
            .tempdir()
            .expect("tempdir");
        for sub in ["data", "run-tgtd"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let holder = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .args(["unshare", "--mount", "--pid", "--fork", "--kill-child"])
            .args(private_network.then_some("--net"))
            .args(["--propagation", "private"])
            .args(["sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs");
        let pid = sleeper_of(holder.id());
        let sandbox = Self { holder, pid, dir };
        let data = sandbox.dir.path().join("data");
        let run = sandbox.dir.path().join("run-tgtd");
        if private_network {
            sandbox.must(&["ip", "link", "set", "lo", "up"]);
        }
        sandbox.must(&[
            "mount",
            "--bind",
            &data.display().to_string(),
            "/var/lib/discus",
        ]);
        sandbox.must(&["mount", "--bind", &run.display().to_string(), "/run/tgtd"]);
        sandbox
    }

    /// A command that runs in the sandbox's namespaces and dies with it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid.to_string(), "-m", "-n", "-p", "--"])
            .arg(program);
        command
    }

    /// Kills (SIGKILL) the program a `command` started, and reaps the nsenter in front of it.
    pub fn kill(&self, child: &mut Child) {
        let inner = super::children(child.id());
        for pid in &inner {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
        // Gone for good — every thread, and so its files and locks — before the test goes on. A
        // killed process's first thread is a zombie while its other threads still exit.
        let start = Instant::now();
        for pid in inner {
            let gone = || {
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |stat| stat.contains(") Z "));
                let threads =
                    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |tasks| tasks.count());
                zombie && threads <= 1
            };
            while !gone() && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Runs a command to completion and fails the test if it fails.
    pub fn must(&self, args: &[&str]) -> String {
        let output = self
            .command(args[0])
            .args(&args[1..])
            .output()
            .expect("runs");
        assert!(
            output.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A TCP listener of the test process's, bound in the sandbox's network namespace (e.g. to
    /// `127.0.0.1:0`): a server in the test that programs in the sandbox reach on its loopback.
    /// Only the thread that binds it enters the namespace; the socket stays there.
    pub fn listen(&self, address: &str) -> std::net::TcpListener {
        let address = address.to_owned();
        self.inside(move || {
            std::net::TcpListener::bind(&address)
                .unwrap_or_else(|e| panic!("bind {address} in the sandbox: {e}"))
        })
    }

    /// A TCP connection of the test process's from inside the sandbox's network namespace.
    pub fn connect(&self, address: &str) -> std::net::TcpStream {
        let address = address.to_owned();
        self.inside(move || {
            std::net::TcpStream::connect(&address)
                .unwrap_or_else(|e| panic!("connect to {address} in the sandbox: {e}"))
        })
    }

    /// Runs `make` on a thread of its own that entered the sandbox's network namespace: the
    /// sockets it makes stay there.
    fn inside<T: Send + 'static>(&self, make: impl FnOnce() -> T + Send + 'static) -> T {
        let namespace = std::fs::File::open(format!("/proc/{}/ns/net", self.pid))
            .expect("the sandbox's network namespace");
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            rustix::thread::move_into_link_name_space(
                namespace.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the sandbox's network namespace");
            make()
        })
        .join()
        .expect("the namespace's thread")
    }

    /// The sandbox's `/var/lib/discus`, as the test sees it.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A scratch folder of the test's, visible inside the sandbox at the same path.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("scratch");
        path
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The host PID of the sandbox's PID 1: what `ip link set … netns` takes.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // PID 1 goes, and the kernel ends every process of the sandbox with it.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The child `unshare --fork` made: the sandbox's PID 1.
fn sleeper_of(unshare: u32) -> u32 {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(&pid) = super::children(unshare).first() {
            // Wait until it runs `sleep` in its namespaces.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the sandbox did not start");
}
