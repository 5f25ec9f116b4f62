//! open-iscsi on the client: its initiator name, its node records, logins and logouts.
//!
//! `iscsiadm` runs with argument vectors and a deadline, never through a shell. CHAP secrets
//! never go on its command line (where `/proc/*/cmdline` shows them to every user): discus
//! writes them into the record `iscsiadm -o new` creates (a new version written aside, readable
//! by root only, renamed over it), and iscsiadm reads them from there at login.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use super::program::{self, complaint};

use crate::api::chap::{ChapAccount, ChapCredentials};
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
        let os_args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let output = program::run(self.program.as_os_str(), &os_args, ISCSIADM_DEADLINE)
            .await
            .map_err(|why| InitiatorError::Iscsiadm {
                what: args.join(" "),
                why: format!("{why} (is open-iscsi installed?)"),
            })?;
        if matches!(
            output.status.code(),
            Some(ISCSID_NOT_CONNECTED | ISCSID_COMM_ERROR)
        ) {
            return Err(InitiatorError::IscsidDown(complaint(&output)));
        }
        Ok(output)
    }

    /// Runs iscsiadm on one node record: `-m node -T <target> -p <portal>` and `extra`.
    async fn on_node(&self, node: &Node, extra: &[&str]) -> Result<Output, InitiatorError> {
        let portal = node.portal.to_string();
        let mut args = vec!["-m", "node", "-T", &node.target, "-p", &portal];
        args.extend_from_slice(extra);
        self.run(&args).await
    }

    /// Fails when iscsid does not answer.
    pub async fn check_iscsid(&self) -> Result<(), InitiatorError> {
        let output = self.run(&["-m", "session"]).await?;
        match output.status.code() {
            Some(0 | NO_OBJECTS_FOUND) => Ok(()),
            _ => Err(InitiatorError::IscsidDown(complaint(&output))),
        }
    }

    /// Whether a node record exists for `node`.
    pub async fn has_record(&self, node: &Node) -> Result<bool, InitiatorError> {
        let output = self.on_node(node, &[]).await?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(NO_OBJECTS_FOUND) => Ok(false),
            _ => Err(node.failed(complaint(&output))),
        }
    }

    /// Creates the record of `node` (manual start-up), with `chap` written into it.
    pub async fn create_record(
        &self,
        node: &Node,
        chap: Option<&ChapCredentials>,
    ) -> Result<(), InitiatorError> {
        let output = self.on_node(node, &["-o", "new"]).await?;
        if !output.status.success() {
            return Err(node.failed(complaint(&output)));
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
        write_chap(&path, chap).map_err(|e| node.failed(e))
    }

    pub async fn delete_record(&self, node: &Node) -> Result<(), InitiatorError> {
        let output = self.on_node(node, &["-o", "delete"]).await?;
        match output.status.code() {
            Some(0 | NO_OBJECTS_FOUND) => Ok(()),
            _ => Err(node.failed(complaint(&output))),
        }
    }

    /// Logs in; a session that exists already is fine.
    pub async fn login(&self, node: &Node) -> Result<(), InitiatorError> {
        let output = self.on_node(node, &["--login"]).await?;
        let portal = node.portal.to_string();
        match output.status.code() {
            Some(0 | SESSION_EXISTS) => Ok(()),
            Some(LOGIN_AUTH_FAILED) => Err(InitiatorError::LoginRefused {
                portal,
                why: "authentication or authorization failed: the node has no ACL for this \
                      initiator (is the grant applied there? kubectl get iacc -o wide), or \
                      refused the CHAP credentials of the grant's Secret"
                    .to_owned(),
            }),
            _ => Err(InitiatorError::LoginRefused {
                portal,
                why: complaint(&output),
            }),
        }
    }

    /// Logs out; no session is fine.
    pub async fn logout(&self, node: &Node) -> Result<(), InitiatorError> {
        let output = self.on_node(node, &["--logout"]).await?;
        match output.status.code() {
            Some(0 | NO_OBJECTS_FOUND) => Ok(()),
            _ => Err(node.failed(complaint(&output))),
        }
    }

    /// The sessions open-iscsi has, as (target, portal).
    pub async fn sessions(&self) -> Result<Vec<(String, SocketAddr)>, InitiatorError> {
        let output = self.run(&["-m", "session"]).await?;
        match output.status.code() {
            Some(0) => Ok(parse_sessions(&String::from_utf8_lossy(&output.stdout))),
            Some(NO_OBJECTS_FOUND) => Ok(Vec::new()),
            _ => Err(InitiatorError::Iscsiadm {
                what: "-m session".to_owned(),
                why: complaint(&output),
            }),
        }
    }
}

/// `iscsiadm -m session` lines: `tcp: [1] 10.0.2.15:3260,1 iqn.… (non-flash)`.
fn parse_sessions(text: &str) -> Vec<(String, SocketAddr)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip(2);
            let (portal, target) = (words.next()?, words.next()?);
            let portal = portal.rsplit_once(',').map_or(portal, |(p, _)| p);
            Some((target.to_owned(), portal.parse().ok()?))
        })
        .collect()
}

/// The record file of `node` (open-iscsi names it `<address>,<port>` in the target's folder
/// when it knows no portal group). Of two folders that hold one, the one written last.
pub fn record_path(node: &Node) -> Option<PathBuf> {
    let name = format!("{},{}", node.portal.ip(), node.portal.port());
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    RECORD_ROOTS
        .iter()
        .map(|root| Path::new(root).join(&node.target).join(&name))
        .filter(|path| path.is_file())
        .max_by_key(|path| modified(path))
}

/// Sets the record's CHAP settings (or none) and manual start-up, keeping every other line as
/// iscsiadm wrote it. The new text is written beside the record root (`/etc/iscsi`), readable
/// by root only, and renamed over the record: a crash never leaves a file in a target's folder.
fn write_chap(path: &Path, chap: Option<&ChapCredentials>) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let edited = with_chap(&text, chap)?;
    let aside = (path.ancestors().nth(3)).ok_or("a record path has a root")?;
    let mut file = tempfile::Builder::new()
        .prefix(".discus-record-")
        .tempfile_in(aside)
        .map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut file, edited.as_bytes()).map_err(|e| e.to_string())?;
    file.as_file().sync_all().map_err(|e| e.to_string())?;
    file.persist(path)
        .map(drop)
        .map_err(|e| e.error.to_string())
}

const OWN_KEYS: [&str; 7] = [
    "node.startup",
    "node.conn[0].startup",
    "node.session.auth.authmethod",
    "node.session.auth.username",
    "node.session.auth.password",
    "node.session.auth.username_in",
    "node.session.auth.password_in",
];

/// A record's text with its CHAP settings replaced and manual start-up (never logged in at
/// boot by itself), before `# END RECORD`.
fn with_chap(text: &str, chap: Option<&ChapCredentials>) -> Result<String, String> {
    let key_of = |line: &str| line.split('=').next().unwrap_or_default().trim().to_owned();
    let mut lines: Vec<String> = (text.lines())
        .filter(|line| !OWN_KEYS.contains(&key_of(line).as_str()))
        .map(str::to_owned)
        .collect();
    let mut own = vec![
        "node.startup = manual".to_owned(),
        "node.conn[0].startup = manual".to_owned(),
        format!(
            "node.session.auth.authmethod = {}",
            if chap.is_some() { "CHAP" } else { "None" }
        ),
    ];
    if let Some(chap) = chap {
        own.extend(account_lines("", &chap.initiator)?);
        if let Some(target) = &chap.mutual {
            own.extend(account_lines("_in", target)?);
        }
    }
    let end = (lines.iter().position(|l| l.trim() == "# END RECORD")).unwrap_or(lines.len());
    lines.splice(end..end, own);
    let mut text = lines.join("\n");
    text.push('\n');
    Ok(text)
}

/// A CHAP account's two record lines. open-iscsi trims a value's leading blanks and `=` and its
/// trailing blanks: such a value would not be stored as it is, and is refused.
fn account_lines(suffix: &str, account: &ChapAccount) -> Result<[String; 2], String> {
    let stored_as_is = |value: &str| {
        !value.starts_with(|c: char| c == '=' || c.is_whitespace())
            && !value.ends_with(char::is_whitespace)
    };
    if !stored_as_is(&account.username) || !stored_as_is(account.password.expose()) {
        return Err(format!(
            "the CHAP {} of the grant's Secret starts with a blank or '=', or ends with a \
             blank: open-iscsi cannot store it as it is",
            if suffix.is_empty() {
                "credentials"
            } else {
                "mutual credentials"
            }
        ));
    }
    Ok([
        format!("node.session.auth.username{suffix} = {}", account.username),
        format!(
            "node.session.auth.password{suffix} = {}",
            account.password.expose()
        ),
    ])
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
        let edited = with_chap(RECORD, Some(&chap)).expect("edited");
        assert_eq!(
            edited,
            "# BEGIN RECORD 2.1.8\nnode.name = iqn.2026-11.dev.discus:demo\n\
             node.session.auth.chap_algs = MD5\nnode.conn[0].port = 3260\n\
             node.startup = manual\nnode.conn[0].startup = manual\n\
             node.session.auth.authmethod = CHAP\nnode.session.auth.username = web-1\n\
             node.session.auth.password = s3cret-s3cret\nnode.session.auth.username_in = target\n\
             node.session.auth.password_in = other-s3cret\n# END RECORD\n"
        );
        // Written again, the same: idempotent.
        assert_eq!(with_chap(&edited, Some(&chap)).as_ref(), Ok(&edited));
        // And taken away again.
        assert_eq!(
            with_chap(&edited, None).expect("edited"),
            "# BEGIN RECORD 2.1.8\nnode.name = iqn.2026-11.dev.discus:demo\n\
             node.session.auth.chap_algs = MD5\nnode.conn[0].port = 3260\n\
             node.startup = manual\nnode.conn[0].startup = manual\n\
             node.session.auth.authmethod = None\n# END RECORD\n"
        );
        // A secret open-iscsi would store otherwise is refused, and not shown.
        let padded = ChapCredentials {
            initiator: account("web-1", " s3cret-s3cret"),
            mutual: None,
        };
        let refused = with_chap(RECORD, Some(&padded)).expect_err("refused");
        assert!(
            refused.contains("starts with a blank") && !refused.contains("s3cret"),
            "{refused}"
        );
    }

    #[test]
    fn sessions_are_read_from_iscsiadm_s_list() {
        let listed = "tcp: [1] 10.0.2.15:3260,1 iqn.2026-11.dev.discus:demo (non-flash)\n\
                      tcp: [2] [fd00::16]:3260,1 iqn.2026-11.dev.discus:demo (non-flash)\n";
        assert_eq!(
            parse_sessions(listed),
            [
                (
                    "iqn.2026-11.dev.discus:demo".to_owned(),
                    "10.0.2.15:3260".parse().expect("portal")
                ),
                (
                    "iqn.2026-11.dev.discus:demo".to_owned(),
                    "[fd00::16]:3260".parse().expect("portal")
                ),
            ]
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
