//! qemu-img, run as an argument vector under `prlimit` (address space and CPU time) with a
//! wall-clock timeout, and always with an explicit `-f`: qemu-img never guesses a format here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::inspect::Format;

/// Limits for one kind of qemu-img run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub address_space_bytes: u64,
    pub cpu_seconds: u64,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct QemuImg {
    pub binary: PathBuf,
    /// OpenStack's limits for `qemu-img info` on untrusted images: 1 GiB, 30 s of CPU.
    pub info: Limits,
    pub convert: Limits,
}

impl Default for QemuImg {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-img"),
            info: Limits {
                address_space_bytes: 1 << 30,
                cpu_seconds: 30,
                timeout: Duration::from_secs(60),
            },
            convert: Limits {
                address_space_bytes: 4 << 30,
                cpu_seconds: 4 * 3600,
                timeout: Duration::from_secs(6 * 3600),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot run {program}: {source} (is {package} installed?)")]
    Spawn {
        program: String,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("qemu-img {operation} took longer than {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    #[error("qemu-img {operation} failed ({status}): {stderr}")]
    Failed {
        operation: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("qemu-img info printed what discus cannot read: {0}")]
    Output(String),
    #[error("qemu-img info says the image {0}; discus serves standalone images only")]
    RefersToOtherFiles(String),
}

/// What qemu-img says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub virtual_size: u64,
}

impl QemuImg {
    /// `qemu-img info --output=json -f <format>`, refusing anything that refers to another file
    /// (a second line of defence behind the inspector).
    pub async fn info(&self, path: &Path, format: Format) -> Result<Info, QemuError> {
        let args = [
            "info".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            path.as_os_str(),
        ];
        let output = self.run("info", &self.info, &args, None).await?;
        parse_info(&output, path)
    }

    /// `qemu-img convert -f <format> -O raw`, reporting the fraction done.
    pub async fn convert(
        &self,
        source: &Path,
        format: Format,
        target: &Path,
        on_progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<(), QemuError> {
        let args = [
            "convert".as_ref(),
            "-p".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            source.as_os_str(),
            target.as_os_str(),
        ];
        self.run("convert", &self.convert, &args, Some(on_progress))
            .await?;
        Ok(())
    }

    async fn run(
        &self,
        operation: &'static str,
        limits: &Limits,
        args: &[&std::ffi::OsStr],
        mut on_progress: Option<&mut (dyn FnMut(f64) + Send)>,
    ) -> Result<String, QemuError> {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--as={}", limits.address_space_bytes))
            .arg(format!("--cpu={}", limits.cpu_seconds))
            .arg("--")
            .arg(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| QemuError::Spawn {
            program: "prlimit".into(),
            package: "util-linux",
            source,
        })?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| QemuError::Output("no stdout".into()))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| QemuError::Output("no stderr".into()))?;
        let work = async {
            let mut out = Vec::new();
            let mut chunk = [0u8; 4096];
            let reading = async {
                loop {
                    let n = stdout.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&chunk[..n]);
                    if let Some(report) = on_progress.as_mut() {
                        // `-p` prints "    (12.34/100%)\r" as it goes.
                        if let Some(fraction) = last_progress(&out) {
                            report(fraction);
                        }
                        if out.len() > 64 * 1024 {
                            out.drain(..out.len() - 1024);
                        }
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            let mut err = String::new();
            let (read_out, read_err) = tokio::join!(reading, stderr.read_to_string(&mut err));
            let status = child.wait().await;
            (read_out.and(read_err.map(drop)).and(status), out, err)
        };
        let (status, out, err) =
            tokio::time::timeout(limits.timeout, work)
                .await
                .map_err(|_| QemuError::Timeout {
                    operation,
                    timeout: limits.timeout,
                })?;
        let status = status.map_err(|source| QemuError::Spawn {
            program: self.binary.display().to_string(),
            package: "qemu-utils",
            source,
        })?;
        if !status.success() {
            let stderr = err.trim().to_owned();
            if stderr.contains("failed to execute") {
                return Err(QemuError::Spawn {
                    program: self.binary.display().to_string(),
                    package: "qemu-utils",
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, stderr),
                });
            }
            return Err(QemuError::Failed {
                operation,
                status,
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn last_progress(out: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(out).ok()?;
    let last = text.rsplit('(').next()?;
    let percent = last.split('/').next()?.trim();
    percent
        .parse::<f64>()
        .ok()
        .map(|p| (p / 100.0).clamp(0.0, 1.0))
}

fn parse_info(output: &str, path: &Path) -> Result<Info, QemuError> {
    let info: serde_json::Value =
        serde_json::from_str(output).map_err(|e| QemuError::Output(e.to_string()))?;
    if let Some(backing) = info.get("backing-filename") {
        return Err(QemuError::RefersToOtherFiles(format!(
            "has the backing file {backing}"
        )));
    }
    let data = &info["format-specific"]["data"];
    if let Some(file) = data.get("data-file") {
        return Err(QemuError::RefersToOtherFiles(format!(
            "keeps its data in {file}"
        )));
    }
    if info.get("encrypted").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err(QemuError::RefersToOtherFiles("is encrypted".into()));
    }
    for extent in data
        .get("extents")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
    {
        let file = extent.get("filename").and_then(serde_json::Value::as_str);
        if file.map(Path::new) != Some(path) {
            return Err(QemuError::RefersToOtherFiles(format!(
                "has an extent in {}",
                file.unwrap_or("an unnamed file")
            )));
        }
    }
    let virtual_size = info
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| QemuError::Output("no virtual-size".into()))?;
    Ok(Info { virtual_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_virtual_size_and_refuses_references() {
        let path = Path::new("/data/tmp/work.part");
        let ok = r#"{"virtual-size": 1048576, "format": "qcow2", "format-specific": {"data": {}}}"#;
        assert_eq!(
            parse_info(ok, path).ok(),
            Some(Info {
                virtual_size: 1 << 20
            })
        );
        let refused = [
            r#"{"virtual-size": 1, "backing-filename": "/etc/passwd"}"#,
            r#"{"virtual-size": 1, "format-specific": {"data": {"data-file": "/etc/passwd"}}}"#,
            r#"{"virtual-size": 1, "encrypted": true}"#,
            r#"{"virtual-size": 1, "format-specific": {"data": {"extents": [{"filename": "/etc/passwd"}]}}}"#,
        ];
        for output in refused {
            assert!(
                matches!(
                    parse_info(output, path),
                    Err(QemuError::RefersToOtherFiles(_))
                ),
                "{output}"
            );
        }
        let own = r#"{"virtual-size": 2, "format-specific": {"data": {"extents": [{"filename": "/data/tmp/work.part"}]}}}"#;
        assert!(parse_info(own, path).is_ok());
        assert!(matches!(
            parse_info("not json", path),
            Err(QemuError::Output(_))
        ));
    }

    #[test]
    fn reads_progress_lines() {
        assert_eq!(
            last_progress(b"    (0.00/100%)\r    (51.00/100%)\r"),
            Some(0.51)
        );
        assert_eq!(last_progress(b""), None);
    }
}
