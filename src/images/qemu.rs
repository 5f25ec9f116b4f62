//! qemu-img, run as an argument vector under `prlimit` (address space and CPU time) with a
//! wall-clock timeout, and always with an explicit `-f`: qemu-img never guesses a format here.
//!
//! What qemu-img prints is not passed on as it is: its errors name files, and for a hostile image
//! that names a host file they say whether that file exists (an oracle for whoever may create a
//! DiscImage). Errors keep qemu-img's words but lose every path; an error about any file other
//! than the image itself becomes one fixed sentence. The same goes for the files `qemu-img info`
//! reports.

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
    /// `summary` is qemu-img's error without paths (see [`summarize`]).
    #[error("qemu-img {operation} failed ({status}): {summary}")]
    Failed {
        operation: &'static str,
        status: std::process::ExitStatus,
        summary: String,
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
        let own = [(path, "the image")];
        let output = self.run("info", &self.info, &args, &own, None).await?;
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
        let own = [(source, "the image"), (target, "the output")];
        self.run("convert", &self.convert, &args, &own, Some(on_progress))
            .await?;
        Ok(())
    }

    async fn run(
        &self,
        operation: &'static str,
        limits: &Limits,
        args: &[&std::ffi::OsStr],
        own: &[(&Path, &str)],
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
            if err.starts_with("prlimit: failed to execute") {
                return Err(QemuError::Spawn {
                    program: self.binary.display().to_string(),
                    package: "qemu-utils",
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "prlimit could not execute it",
                    ),
                });
            }
            return Err(QemuError::Failed {
                operation,
                status,
                summary: summarize(&err, own),
            });
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// What an error about another file says, whatever qemu-img said.
pub const OTHER_FILE: &str =
    "qemu-img tried to open a file the image refers to; discus serves standalone images only";

/// qemu-img's error text without paths: the image's own paths become their names (`own`), and
/// if anything else looks like a file name — a quoted string, a word starting with `/`, `./` or
/// `~` — the whole text becomes [`OTHER_FILE`], since whether such a file opened, and how, is
/// exactly what must not leak. Control characters are dropped, lines joined, the length capped.
pub fn summarize(stderr: &str, own: &[(&Path, &str)]) -> String {
    let mut text = stderr.to_owned();
    for (path, name) in own {
        let path = path.display().to_string();
        for quoted in [format!("'{path}'"), format!("\"{path}\""), path] {
            text = text.replace(&quoted, name);
        }
    }
    if names_a_file(&text) {
        return OTHER_FILE.to_owned();
    }
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let line = line.trim();
            let line = line.strip_prefix("qemu-img: ").unwrap_or(line);
            line.chars().filter(|c| !c.is_control()).collect()
        })
        .filter(|line: &String| !line.is_empty())
        .collect();
    let summary = lines.join("; ");
    match summary.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &summary[..cut]),
        None if summary.is_empty() => "no error message".to_owned(),
        None => summary,
    }
}

/// Whether the text still holds something that looks like a file name: a quote that opens a
/// string (not an apostrophe inside a word) or a word that starts like a path.
fn names_a_file(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let opens_quote = chars
        .iter()
        .enumerate()
        .any(|(i, c)| matches!(c, '\'' | '"' | '`') && (i == 0 || !chars[i - 1].is_alphanumeric()));
    let path_word = text
        .split(|c: char| c.is_whitespace() || c == ':' || c == '(' || c == ',')
        .any(|word| word.starts_with('/') || word.starts_with("./") || word.starts_with('~'));
    opens_quote || path_word
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
    // The file names themselves are not shown: see the module's header.
    if info.get("backing-filename").is_some() {
        return Err(QemuError::RefersToOtherFiles("has a backing file".into()));
    }
    let data = &info["format-specific"]["data"];
    if data.get("data-file").is_some() {
        return Err(QemuError::RefersToOtherFiles(
            "keeps its data in another file".into(),
        ));
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
            return Err(QemuError::RefersToOtherFiles(
                "has an extent in another file".into(),
            ));
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
    fn errors_lose_every_path_and_say_nothing_about_other_files() {
        let image = Path::new("/var/lib/discus/tmp/work-Ab12.part");
        let own = [(image, "the image")];
        let cases = [
            (
                "qemu-img: Could not open '/var/lib/discus/tmp/work-Ab12.part': Could not read L1 table: Input/output error\n",
                "Could not open the image: Could not read L1 table: Input/output error",
            ),
            (
                "qemu-img: Could not open '/etc/shadow': No such file or directory",
                OTHER_FILE,
            ),
            (
                "qemu-img: Could not open backing file: Could not open '/etc/passwd': Permission denied",
                OTHER_FILE,
            ),
            (
                "qemu-img: Invalid extent line: RW 4 FLAT \"x\" 0",
                OTHER_FILE,
            ),
            (
                "qemu-img: Could not open /root/.ssh/id_rsa: denied",
                OTHER_FILE,
            ),
            (
                "qemu-img: Image is corrupt; can't open read/write\x1b[2J",
                "Image is corrupt; can't open read/write[2J",
            ),
            ("", "no error message"),
        ];
        for (stderr, expected) in cases {
            let summary = summarize(stderr, &own);
            assert_eq!(summary, expected, "{stderr}");
            assert!(!summary.contains("/var/lib/discus"), "{summary}");
        }
        let long = "x".repeat(1000);
        assert_eq!(summarize(&long, &own).chars().count(), 301);
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
