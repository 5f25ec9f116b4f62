//! Mounting a disc read-only on the client, and unmounting only that.
//!
//! What comes over the network is mounted `ro,nosuid,nodev,noexec` — whoever can change an image
//! must not get setuid programs or device files onto a client — with the block device itself
//! set read-only first, so that not even a file system's journal replay writes to it. After
//! mounting, the device seen at the mount point must be the one whose serial was checked.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use super::ClientError;
use super::program::{self, complaint, shown};
use super::state::Mounted;

const DEADLINE: Duration = Duration::from_secs(60);

/// Where `device` goes: `dir` (made when missing) resolved, and the device's number; `true`
/// when it is mounted there already. Another device there is an error.
pub fn prepare(device: &Path, dir: &Path) -> Result<(Mounted, bool), ClientError> {
    let refused =
        |e: &dyn std::fmt::Display| ClientError::Refused(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| refused(&e))?;
    let path = std::fs::canonicalize(dir).map_err(|e| refused(&e))?;
    let number = device_number(device)
        .ok_or_else(|| ClientError::Refused(format!("{}: not a block device", device.display())))?;
    match mounted_device(&path) {
        Some(there) if there == number => Ok((
            Mounted {
                path,
                device: number,
            },
            true,
        )),
        Some((major, minor)) => Err(refused(&format!(
            "another device is mounted there ({major}:{minor}); unmount it or choose another --mount"
        ))),
        None => Ok((
            Mounted {
                path,
                device: number,
            },
            false,
        )),
    }
}

/// Mounts `device` read-only as `mounted` says, and checks that it is what is seen there.
pub async fn read_only(device: &Path, mounted: &Mounted) -> Result<(), ClientError> {
    run("blockdev", &["--setro".as_ref(), device.as_os_str()]).await?;
    let options = "ro,nosuid,nodev,noexec";
    let at = mounted.path.as_os_str();
    run(
        "mount",
        &["-o".as_ref(), options.as_ref(), device.as_os_str(), at],
    )
    .await?;
    if mounted_device(&mounted.path) != Some(mounted.device) {
        return Err(ClientError::Refused(format!(
            "{}: after mount, another device is seen there",
            mounted.path.display()
        )));
    }
    Ok(())
}

/// Unmounts what connect mounted, if it is still mounted there.
pub async fn unmount(mounted: &Mounted) -> Result<(), ClientError> {
    if mounted_device(&mounted.path) == Some(mounted.device) {
        run("umount", &[mounted.path.as_os_str()]).await?;
    }
    Ok(())
}

async fn run(program: &str, args: &[&OsStr]) -> Result<(), ClientError> {
    let program = OsStr::new(program);
    let output = program::run(program, args, DEADLINE)
        .await
        .map_err(|why| ClientError::Refused(format!("{}: {why}", shown(program, args))))?;
    if output.status.success() {
        return Ok(());
    }
    Err(ClientError::Refused(format!(
        "{}: {}",
        shown(program, args),
        complaint(&output)
    )))
}

/// The device (major, minor) mounted at `dir` (absolute, without symbolic links), from this
/// process's mount table; the last mount on a point is the one seen there.
pub fn mounted_device(dir: &Path) -> Option<(u32, u32)> {
    let dir = dir.as_os_str().to_string_lossy();
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Field 3 is major:minor, field 5 the mount point (spaces and such escaped as octal).
    let number = table.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let (number, point) = (fields.get(2)?, fields.get(4)?);
        (unescape_octal(point) == dir).then_some(*number)
    })?;
    let (major, minor) = number.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The (major, minor) of a block device.
fn device_number(device: &Path) -> Option<(u32, u32)> {
    let stat = rustix::fs::stat(device).ok()?;
    let is_block =
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::BlockDevice;
    is_block.then(|| {
        (
            rustix::fs::major(stat.st_rdev),
            rustix::fs::minor(stat.st_rdev),
        )
    })
}

fn unescape_octal(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes() {
        assert_eq!(unescape_octal("/mnt/my\\040disc"), "/mnt/my disc");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert!(mounted_device(Path::new("/")).is_some());
        assert_eq!(device_number(Path::new("/etc/hostname")), None);
    }
}
