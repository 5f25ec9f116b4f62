//! A real initiator's view: qemu-img's iSCSI driver reading a whole LUN.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Where and as whom to log in.
pub struct Login<'a> {
    pub portal: &'a str,
    pub iqn: &'a str,
    /// The LUN number as initiators see it.
    pub lun: u32,
    pub initiator: &'a str,
    pub user: &'a str,
    pub password: &'a str,
}

/// Reads the whole LUN into `out` and returns the SHA-256 of what was read, or why it failed.
pub fn read_lun(login: &Login<'_>, out: &Path) -> Result<String, String> {
    let Login {
        portal,
        iqn,
        lun,
        initiator,
        user,
        password,
    } = login;
    let options = format!(
        "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun={lun},user={user},\
         password={password},initiator-name={initiator}"
    );
    let output = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--image-opts", &options])
        .arg(out)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let bytes = std::fs::read(out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

/// Starts a session that must never drop — one request at a time, for an hour — as `initiator`
/// to `url` (`iscsi://user%password@portal/iqn/lun`), with `iscsi_perf` (a `Command` for
/// iscsi-perf, on this host or inside a sandbox).
pub fn steady_session(
    mut iscsi_perf: std::process::Command,
    initiator: &str,
    url: &str,
) -> std::process::Child {
    iscsi_perf
        .args([
            "-i", initiator, "-m", "1", "-b", "1", "-x", "0", "-t", "3600",
        ])
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iscsi-perf runs (libiscsi-bin)")
}

/// Ends a `steady_session`, which must still be running: its session never dropped.
pub fn end_steady_session(mut session: std::process::Child) {
    assert!(
        session.try_wait().expect("iscsi-perf").is_none(),
        "iscsi-perf ended: the steady session dropped"
    );
    let _ = session.kill();
    let _ = session.wait();
}
