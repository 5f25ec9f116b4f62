//! open-iscsi on the client: its initiator name, its node records, logins and logouts.
//!
//! `iscsiadm` runs with argument vectors and a deadline, never through a shell. CHAP secrets
//! never go on its command line (where `/proc/*/cmdline` shows them to every user): the record
//! `iscsiadm -o new` creates is edited in place — written aside, then
//! renamed, readable by root only — and iscsiadm reads the secrets from it at login.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::api::chap::ChapCredentials;
use crate::api::rules;

/// Where open-iscsi keeps its initiator name.
pub const INITIATOR_NAME_FILE: &str = "/etc/iscsi/initiatorname.iscsi";
/// Where distributions keep node records: Debian and Ubuntu, then Fedora, RHEL and SUSE.
const RECORD_ROOTS: [&str; 2] = ["/etc/iscsi/nodes", "/var/lib/iscsi/nodes"];
/// Longer than a login open-iscsi gives up on (4 tries of 15 s, with the waits between).
const ISCSIADM_DEADLINE: Duration = Duration::from_secs(150);

// iscsiadm's exit codes (open-iscsi's iscsi_err.h).
const SESSION_EXISTS: i32 = 15;
const NO_OBJECTS_FOUND: i32 = 21;
const LOGIN_AUTH_FAILED: i32 = 24;
const ISCSID_NOT_CONNECTED: i32 = 20;
const ISCSID_COMM_ERROR: i32 = 18;

#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    #[error(
        "cannot read this machine's initiator name from {path}: {why}; install open-iscsi \
         (apt install open-iscsi) or give --initiator-iqn"
    )]
    Name { path: String, why: String },
    #[error("iscsid is not running: start it (systemctl start iscsid) and try again ({0})")]
    IscsidDown(String),
    #[error("{portal} refused the login: {why}")]
    LoginRefused { portal: String, why: String },
    #[error("iscsiadm {what}: {why}")]
    Iscsiadm { what: String, why: String },
    #[error("the node record of {target} at {portal}: {why}")]
    Record {
        target: String,
        portal: String,
        why: String,
    },
}

/// This machine's initiator name, as open-iscsi sends it at login.
pub fn local_name(path: &Path) -> Result<String, InitiatorError> {
    let failed = |why: String| InitiatorError::Name {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let name = (text.lines())
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| line.trim().strip_prefix("InitiatorName="))
        .ok_or_else(|| failed("no InitiatorName= line".to_owned()))?
        .trim()
        .to_owned();
    rules::iscsi_name(&name).map_err(|e| failed(format!("InitiatorName {e}")))?;
    Ok(name)
}

/// One target at one portal, as iscsiadm names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub target: String,
    pub portal: SocketAddr,
}

impl Node {
    fn args<'a>(&'a self, portal: &'a str) -> [&'a str; 6] {
        ["-m", "node", "-T", &self.target, "-p", portal]
    }

    fn failed(&self, why: impl Into<String>) -> InitiatorError {
        InitiatorError::Record {
            target: self.target.clone(),
            portal: self.portal.to_string(),
            why: why.into(),
        }
    }
}

/// Runs iscsiadm (the program at `program`).
#[derive(Clone, Debug)]
pub struct Iscsiadm {
    pub program: PathBuf,
}

impl Default for Iscsiadm {
    fn default() -> Self {
        Self {
            program: PathBuf::from("iscsiadm"),
        }
    }
}

impl Iscsiadm {
    async fn run(&self, args: &[&str]) -> Result<Output, InitiatorError> {
        let mut command = tokio::process::Command::new(&self.program);
        command.args(args).kill_on_drop(true);
        let what = args.join(" ");
        let output = tokio::time::timeout(ISCSIADM_DEADLINE, command.output())
            .await
            .map_err(|_| InitiatorError::Iscsiadm {
                what: what.clone(),
                why: format!("no answer within {}s", ISCSIADM_DEADLINE.as_secs()),
            })?
            .map_err(|e| InitiatorError::Iscsiadm {
                what: what.clone(),
                why: format!("{e} (is open-iscsi installed?)"),
            })?;
        if matches!(
            output.status.code(),
            Some(ISCSID_NOT_CONNECTED | ISCSID_COMM_ERROR)
        ) {
            return Err(InitiatorError::IscsidDown(stderr(&output)));
        }
        Ok(output)
    }

    /// Fails when iscsid does not answer.
    pub async fn check_iscsid(&self) -> Result<(), InitiatorError> {
        let output = self.run(&["-m", "session"]).await?;
        match output.status.code() {
            Some(0 | NO_OBJECTS_FOUND) => Ok(()),
            _ => Err(InitiatorError::IscsidDown(stderr(&output))),
        }
    }

    /// Whether a node record exists for `node`.
    pub async fn has_record(&self, node: &Node) -> Result<bool, InitiatorError> {
        let portal = node.portal.to_string();
        let output = self.run(&node.args(&portal)).await?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(NO_OBJECTS_FOUND) => Ok(false),
            _ => Err(node.failed(stderr(&output))),
        }
    }

    /// Creates the record of `node` (manual start-up), with `chap` written into it.
    pub async fn create_record(
        &self,
        node: &Node,
        chap: Option<&ChapCredentials>,
    ) -> Result<(), InitiatorError> {
        let portal = node.portal.to_string();
        let mut args = node.args(&portal).to_vec();
        args.extend(["-o", "new"]);
        let output = self.run(&args).await?;
        if !output.status.success() {
            return Err(node.failed(stderr(&output)));
        }
        self.set_chap(node, chap)
    }

    /// Writes `chap` (or none) into the record of `node`.
    pub fn set_chap(
        &self,
        node: &Node,
        chap: Option<&ChapCredentials>,
    ) -> Result<(), InitiatorError> {
        let path = record_path(node).ok_or_else(|| {
            node.failed(format!(
                "no record file under {}",
                RECORD_ROOTS.join(" or ")
            ))
        })?;
        write_chap(&path, chap).map_err(|e| node.failed(e.to_string()))
    }

    pub async fn delete_record(&self, node: &Node) -> Result<(), InitiatorError> {
        let portal = node.portal.to_string();
        let mut args = node.args(&portal).to_vec();
        args.extend(["-o", "delete"]);
        let output = self.run(&args).await?;
        match output.status.code() {
            Some(0 | NO_OBJECTS_FOUND) => Ok(()),
            _ => Err(node.failed(stderr(&output))),
        }
    }

    /// Logs in; a session that exists already is fine.
    pub async fn login(&self, node: &Node) -> Result<(), InitiatorError> {
        let portal = node.portal.to_string();
        let mut args = node.args(&portal).to_vec();
        args.push("--login");
        let output = self.run(&args).await?;
        match output.status.code() {
            Some(0 | SESSION_EXISTS) => Ok(()),
            Some(LOGIN_AUTH_FAILED) => Err(InitiatorError::LoginRefused {
                portal,
                why: "authentication failed: the CHAP credentials of the grant's Secret were \
                      refused (changed since the record was written? run discus disconnect, \
                      then connect again)"
                    .to_owned(),
            }),
            _ => Err(InitiatorError::LoginRefused {
                portal,
                why: stderr(&output),
            }),
        }
    }

    /// Logs out; no session is fine.
    pub async fn logout(&self, node: &Node) -> Result<(), InitiatorError> {
        let portal = node.portal.to_string();
        let mut args = node.args(&portal).to_vec();
        args.push("--logout");
        let output = self.run(&args).await?;
        match output.status.code() {
            Some(0 | NO_OBJECTS_FOUND) => Ok(()),
            _ => Err(node.failed(stderr(&output))),
        }
    }
}

/// iscsiadm's complaint, on one line.
fn stderr(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("exit {}: {text}", output.status.code().unwrap_or(-1))
}

/// The record file of `node` (open-iscsi names it `<address>,<port>` in the target's folder,
/// or `<address>,<port>,<tpgt>/<iface>` once discovery knows the portal group).
pub fn record_path(node: &Node) -> Option<PathBuf> {
    let name = format!("{},{}", node.portal.ip(), node.portal.port());
    RECORD_ROOTS
        .iter()
        .map(|root| Path::new(root).join(&node.target).join(&name))
        .find(|path| path.is_file())
}

/// Sets the record's CHAP settings (or none), keeping every other line as iscsiadm wrote it.
fn write_chap(path: &Path, chap: Option<&ChapCredentials>) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let edited = with_chap(&text, chap);
    crate::fsutil::write_atomic(path, edited.as_bytes())
}

const AUTH_KEYS: [&str; 5] = [
    "node.session.auth.authmethod",
    "node.session.auth.username",
    "node.session.auth.password",
    "node.session.auth.username_in",
    "node.session.auth.password_in",
];

/// A record's text with its CHAP settings replaced, before `# END RECORD`.
fn with_chap(text: &str, chap: Option<&ChapCredentials>) -> String {
    let key_of = |line: &str| line.split('=').next().unwrap_or_default().trim().to_owned();
    let mut lines: Vec<String> = (text.lines())
        .filter(|line| !AUTH_KEYS.contains(&key_of(line).as_str()))
        .map(str::to_owned)
        .collect();
    let mut auth = vec![format!(
        "node.session.auth.authmethod = {}",
        if chap.is_some() { "CHAP" } else { "None" }
    )];
    if let Some(chap) = chap {
        auth.push(format!(
            "node.session.auth.username = {}",
            chap.initiator.username
        ));
        auth.push(format!(
            "node.session.auth.password = {}",
            chap.initiator.password.expose()
        ));
        if let Some(target) = &chap.mutual {
            auth.push(format!(
                "node.session.auth.username_in = {}",
                target.username
            ));
            auth.push(format!(
                "node.session.auth.password_in = {}",
                target.password.expose()
            ));
        }
    }
    let end = (lines.iter().position(|l| l.trim() == "# END RECORD")).unwrap_or(lines.len());
    lines.splice(end..end, auth);
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::chap::{ChapAccount, Password};

    const RECORD: &str = "# BEGIN RECORD 2.1.8\nnode.name = iqn.2026-11.dev.discus:demo\n\
        node.session.auth.authmethod = None\nnode.session.auth.chap_algs = MD5\n\
        node.conn[0].port = 3260\n# END RECORD\n";

    fn account(name: &str, password: &str) -> ChapAccount {
        ChapAccount {
            username: name.into(),
            password: Password::new(password.into()),
        }
    }

    #[test]
    fn chap_goes_into_the_record_and_nothing_else_changes() {
        let chap = ChapCredentials {
            initiator: account("web-1", "s3cret-s3cret"),
            mutual: Some(account("target", "other-s3cret")),
        };
        let edited = with_chap(RECORD, Some(&chap));
        assert_eq!(
            edited,
            "# BEGIN RECORD 2.1.8\nnode.name = iqn.2026-11.dev.discus:demo\n\
             node.session.auth.chap_algs = MD5\nnode.conn[0].port = 3260\n\
             node.session.auth.authmethod = CHAP\nnode.session.auth.username = web-1\n\
             node.session.auth.password = s3cret-s3cret\nnode.session.auth.username_in = target\n\
             node.session.auth.password_in = other-s3cret\n# END RECORD\n"
        );
        // Written again, the same: idempotent.
        assert_eq!(with_chap(&edited, Some(&chap)), edited);
        // And taken away again.
        assert_eq!(
            with_chap(&edited, None),
            "# BEGIN RECORD 2.1.8\nnode.name = iqn.2026-11.dev.discus:demo\n\
             node.session.auth.chap_algs = MD5\nnode.conn[0].port = 3260\n\
             node.session.auth.authmethod = None\n# END RECORD\n"
        );
    }

    #[test]
    fn the_initiator_name_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("initiatorname.iscsi");
        std::fs::write(
            &path,
            "## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n",
        )
        .expect("write");
        assert_eq!(
            local_name(&path).expect("name"),
            "iqn.1993-08.org.debian:01:abc"
        );
        std::fs::write(&path, "InitiatorName=iqn.x/../y\n").expect("write");
        let error = local_name(&path).expect_err("refused").to_string();
        assert!(
            error.contains("InitiatorName must not contain '/'"),
            "{error}"
        );
        let error = local_name(&dir.path().join("absent"))
            .expect_err("absent")
            .to_string();
        assert!(error.contains("--initiator-iqn"), "{error}");
    }
}
