//! The rules every field of the API obeys, as Rust functions.
//!
//! `schema.rs` states the same rules for the apiserver (patterns, bounds and CEL). The apiserver
//! can be bypassed — an old CRD, a standalone manifest folder — so the agent and `discus validate`
//! check everything again here. Regular expressions are shared with the schema, so the two cannot
//! drift apart on what a well-formed name looks like.

use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;

/// The longest iSCSI name (RFC 3720 §3.2.6.1); the kernel refuses 224 bytes and more.
pub const ISCSI_NAME_MAX_BYTES: usize = 223;
/// `iqn.YYYY-MM.reversed.domain[:unique]`, lower case, at least two domain labels (as rtslib).
pub const IQN_PATTERN: &str = r"^iqn[.][0-9]{4}-(0[1-9]|1[0-2])[.][a-z0-9]([a-z0-9-]*[a-z0-9])?([.][a-z0-9]([a-z0-9-]*[a-z0-9])?)+(:[a-z0-9.:-]+)?$";
/// `eui.` followed by 16 hex digits (RFC 3720 §3.2.6.3.2).
pub const EUI_PATTERN: &str = r"^eui[.][0-9a-f]{16}$";
/// `naa.` followed by 16 or 32 hex digits (RFC 3980).
pub const NAA_PATTERN: &str = r"^naa[.]([0-9a-f]{16}|[0-9a-f]{32})$";
pub const SHA256_PATTERN: &str = "^[0-9a-f]{64}$";
/// An object name as Kubernetes accepts it (RFC 1123 subdomain).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
pub const DNS_SUBDOMAIN_MAX_BYTES: usize = 253;
/// A CHAP name every backend stores and shows exactly: tgt trims spaces, splits its parameters
/// at commas and marks mutual accounts with a ` (outgoing)` suffix in what it prints.
pub const CHAP_USERNAME_PATTERN: &str = "^[A-Za-z0-9._:@-]+$";
/// RFC 3339, as `kubectl` and the apiserver write times: `2026-12-01T18:00:00Z`,
/// `2026-12-01T18:00:00.5+02:00`.
pub const RFC3339_PATTERN: &str = r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)([.][0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";
pub const CHAP_USERNAME_MAX_BYTES: usize = 255;
/// RFC 3720 §8.2.1 asks for at least 96 random bits; the Microsoft initiator accepts at most 16.
pub const CHAP_SECRET_MIN_CHARS: usize = 12;
pub const CHAP_SECRET_MAX_CHARS: usize = 16;
pub const MAX_LUN: u32 = 255;
/// A held grant's grace: long enough for a renewal every third of it to survive a lost one,
/// short enough to end access within a day.
pub const MIN_GRACE_SECONDS: u32 = 10;
pub const MAX_GRACE_SECONDS: u32 = 86_400;
pub const BLOCK_SIZES: [u32; 4] = [512, 1024, 2048, 4096];
pub const URL_MAX_BYTES: usize = 2048;
pub const PATH_MAX_BYTES: usize = 4096;
pub const DEFAULT_ISCSI_PORT: u16 = 3260;
/// Six colon-separated hex pairs, in either case.
pub const MAC_ADDRESS_PATTERN: &str = "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$";
/// The most MAC addresses and source networks one boot block lists.
pub const MAX_BOOT_MACS: usize = 64;
pub const MAX_BOOT_SOURCES: usize = 64;

fn regex(pattern: &str) -> Regex {
    // The patterns are constants of this module, compiled in tests; failure is a programming error.
    Regex::new(pattern).unwrap_or_else(|e| panic!("invalid built-in pattern {pattern}: {e}"))
}

static IQN: LazyLock<Regex> = LazyLock::new(|| regex(IQN_PATTERN));
static EUI: LazyLock<Regex> = LazyLock::new(|| regex(EUI_PATTERN));
static NAA: LazyLock<Regex> = LazyLock::new(|| regex(NAA_PATTERN));
static SHA256: LazyLock<Regex> = LazyLock::new(|| regex(SHA256_PATTERN));
static DNS_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| regex(DNS_SUBDOMAIN_PATTERN));
static CHAP_USERNAME: LazyLock<Regex> = LazyLock::new(|| regex(CHAP_USERNAME_PATTERN));
static RFC3339: LazyLock<Regex> = LazyLock::new(|| regex(RFC3339_PATTERN));

/// Why a value breaks a rule. The messages state the rule, so a user knows what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {max} bytes, got {len}")]
    TooLong { max: usize, len: usize },
    #[error("must not contain '/' (an iSCSI name becomes a configfs path)")]
    IscsiNameSlash,
    #[error("must not contain '..' (an iSCSI name becomes a configfs path)")]
    IscsiNameDotDot,
    #[error("must not contain whitespace, control or non-ASCII characters")]
    IscsiNameCharacters,
    #[error("must be lower case (iSCSI names are compared in lower case)")]
    IscsiNameUpperCase,
    #[error(
        "must be an iSCSI name (RFC 3720/3721): iqn.YYYY-MM.reversed.domain[:unique] with at least two \
         domain labels and only a-z, 0-9, '.', '-' and ':', or eui. followed by 16 hex digits, or naa. \
         followed by 16 or 32 hex digits"
    )]
    IscsiNameFormat,
    #[error("must be a SHA-256 digest: 64 lower-case hex digits")]
    Sha256,
    #[error(
        "must be a lower-case RFC 1123 name: a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
    )]
    DnsSubdomain,
    #[error("must not contain ','")]
    ChapUsernameComma,
    #[error("must not contain control characters")]
    ControlCharacters,
    #[error(
        "may hold only letters, digits and '.', '_', ':', '@', '-' (no spaces): tgt would not store it exactly"
    )]
    ChapUsernameCharacters,
    #[error("must be {CHAP_SECRET_MIN_CHARS} to {CHAP_SECRET_MAX_CHARS} characters, got {0}")]
    ChapSecretLength(usize),
    #[error("must be a URL with scheme http or https")]
    UrlScheme,
    #[error("must be a valid URL: {0}")]
    Url(String),
    #[error("must name a host")]
    UrlHost,
    #[error("must not carry credentials; put them in a Secret named by headersSecretRef")]
    UrlCredentials,
    #[error("must be an absolute path")]
    PathNotAbsolute,
    #[error("must not contain a '..' segment")]
    PathDotDot,
    #[error("must be between 0 and {MAX_LUN}, got {0}")]
    LunRange(u32),
    #[error("must be between {MIN_GRACE_SECONDS} and {MAX_GRACE_SECONDS} seconds, got {0}")]
    GraceSeconds(u32),
    #[error("must be one of 512, 1024, 2048 or 4096, got {0}")]
    BlockSize(u32),
    #[error("must be an IPv4 or IPv6 address")]
    IpAddress,
    #[error("must be between 1 and 65535, got {0}")]
    Port(u32),
    #[error(
        "must be an RFC 3339 timestamp such as 2026-12-01T18:00:00Z or 2026-12-01T19:00:00+01:00"
    )]
    Timestamp,
    #[error("must be a MAC address: six hex pairs separated by ':', such as 52:54:00:12:34:56")]
    MacAddress,
    #[error("must be one network card's address, not a multicast group's")]
    MacMulticast,
    #[error("must name each card once: the same MAC address twice, in either case")]
    MacTwice,
    #[error("must be a network in CIDR notation, such as 192.0.2.0/24 or 2001:db8::/32")]
    Cidr,
}

/// A string of 1 to `max` bytes.
fn length(value: &str, max: usize) -> Result<(), RuleError> {
    match value.len() {
        0 => Err(RuleError::Empty),
        len if len > max => Err(RuleError::TooLong { max, len }),
        _ => Ok(()),
    }
}

/// Checks an iSCSI name (target or initiator). The order of checks gives the most specific message.
pub fn iscsi_name(name: &str) -> Result<(), RuleError> {
    length(name, ISCSI_NAME_MAX_BYTES)?;
    if name.contains('/') {
        return Err(RuleError::IscsiNameSlash);
    }
    if name.contains("..") {
        return Err(RuleError::IscsiNameDotDot);
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RuleError::IscsiNameCharacters);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(RuleError::IscsiNameUpperCase);
    }
    if IQN.is_match(name) || EUI.is_match(name) || NAA.is_match(name) {
        Ok(())
    } else {
        Err(RuleError::IscsiNameFormat)
    }
}

pub fn sha256_hex(value: &str) -> Result<(), RuleError> {
    if SHA256.is_match(value) {
        Ok(())
    } else {
        Err(RuleError::Sha256)
    }
}

/// A reference to another object by name.
pub fn object_name(name: &str) -> Result<(), RuleError> {
    length(name, DNS_SUBDOMAIN_MAX_BYTES)?;
    if DNS_SUBDOMAIN.is_match(name) {
        Ok(())
    } else {
        Err(RuleError::DnsSubdomain)
    }
}

pub fn chap_username(name: &str) -> Result<(), RuleError> {
    length(name, CHAP_USERNAME_MAX_BYTES)?;
    // tgtadm passes parameters as a comma-joined list and silently cuts a username at a comma.
    if name.contains(',') {
        return Err(RuleError::ChapUsernameComma);
    }
    if name.chars().any(char::is_control) {
        return Err(RuleError::ControlCharacters);
    }
    if !CHAP_USERNAME.is_match(name) {
        return Err(RuleError::ChapUsernameCharacters);
    }
    Ok(())
}

pub fn chap_secret(secret: &str) -> Result<(), RuleError> {
    // configfs stores CHAP secrets verbatim, so a trailing newline would become part of the secret.
    if secret.chars().any(char::is_control) {
        return Err(RuleError::ControlCharacters);
    }
    let chars = secret.chars().count();
    if (CHAP_SECRET_MIN_CHARS..=CHAP_SECRET_MAX_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(RuleError::ChapSecretLength(chars))
    }
}

pub fn http_url(value: &str) -> Result<url::Url, RuleError> {
    length(value, URL_MAX_BYTES)?;
    let url = url::Url::parse(value).map_err(|e| RuleError::Url(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(RuleError::UrlScheme);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(RuleError::UrlHost);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(RuleError::UrlCredentials);
    }
    Ok(url)
}

/// A path on the storage node. Where it may point is decided by the agent's configured roots.
pub fn node_path(path: &str) -> Result<(), RuleError> {
    length(path, PATH_MAX_BYTES)?;
    if !path.starts_with('/') {
        return Err(RuleError::PathNotAbsolute);
    }
    if path.chars().any(char::is_control) {
        return Err(RuleError::ControlCharacters);
    }
    if path.split('/').any(|segment| segment == "..") {
        return Err(RuleError::PathDotDot);
    }
    Ok(())
}

pub fn lun(number: u32) -> Result<(), RuleError> {
    if number <= MAX_LUN {
        Ok(())
    } else {
        Err(RuleError::LunRange(number))
    }
}

pub fn grace_seconds(seconds: u32) -> Result<std::time::Duration, RuleError> {
    if (MIN_GRACE_SECONDS..=MAX_GRACE_SECONDS).contains(&seconds) {
        Ok(std::time::Duration::from_secs(u64::from(seconds)))
    } else {
        Err(RuleError::GraceSeconds(seconds))
    }
}

pub fn block_size(size: u32) -> Result<(), RuleError> {
    if BLOCK_SIZES.contains(&size) {
        Ok(())
    } else {
        Err(RuleError::BlockSize(size))
    }
}

pub fn ip_address(address: &str) -> Result<IpAddr, RuleError> {
    address.parse().map_err(|_| RuleError::IpAddress)
}

/// One network card's MAC address.
pub fn mac_address(text: &str) -> Result<super::mac::MacAddress, RuleError> {
    let mac: super::mac::MacAddress = text.parse()?;
    if mac.is_multicast() {
        return Err(RuleError::MacMulticast);
    }
    Ok(mac)
}

/// A network, `address/prefix`, with no host bits set (`10.0.0.1/24` is a mistake for
/// `10.0.0.0/24` or `10.0.0.1/32`).
pub fn cidr(text: &str) -> Result<ipnet::IpNet, RuleError> {
    let net: ipnet::IpNet = text.parse().map_err(|_| RuleError::Cidr)?;
    if net.trunc() != net {
        return Err(RuleError::Cidr);
    }
    Ok(net)
}

pub fn port(port: u32) -> Result<u16, RuleError> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(RuleError::Port(port)),
    }
}

/// A point in time, strictly as RFC 3339 writes it (no `[Europe/Paris]`, no space for `T`, no
/// basic format). The latest instants of year 9999, past what the clock library holds, are the
/// end of time.
pub fn timestamp(value: &str) -> Result<k8s_openapi::jiff::Timestamp, RuleError> {
    use k8s_openapi::jiff::Timestamp;
    if !RFC3339.is_match(value) {
        return Err(RuleError::Timestamp);
    }
    // A leap second is the second before.
    let value = value.replacen(":60", ":59", 1);
    match value.parse::<Timestamp>() {
        Ok(at) => Ok(at),
        Err(_) if value.starts_with("9999-") => Ok(Timestamp::MAX),
        Err(_) => Err(RuleError::Timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_compile() {
        for p in [
            IQN_PATTERN,
            EUI_PATTERN,
            NAA_PATTERN,
            SHA256_PATTERN,
            DNS_SUBDOMAIN_PATTERN,
        ] {
            Regex::new(p).expect(p);
        }
    }

    #[test]
    fn iscsi_names_that_real_initiators_and_targets_use_are_accepted() {
        for name in [
            "iqn.2026-11.dev.discus:lab.debian-installer",
            "iqn.1993-08.org.debian:01:2f3a4b5c6d7e",
            "iqn.1991-05.com.microsoft:win-build01.corp.example.com",
            "iqn.2010-04.org.ipxe:00000000-0000-0000-0000-002590a1b2c3",
            "iqn.1998-01.com.vmware:esx01-4f5a6b7c",
            "iqn.2003-01.org.linux-iscsi.host.x8664:sn.0123456789ab",
            "iqn.2026-11.dev.discus",
            "eui.02004567a425678d",
            "naa.52004567ba64678d",
            "naa.60014050123456789abcdef012345678",
        ] {
            assert_eq!(iscsi_name(name), Ok(()), "{name}");
        }
        let longest = format!("iqn.2026-11.dev.discus:{}", "a".repeat(223 - 23));
        assert_eq!(longest.len(), 223);
        assert_eq!(iscsi_name(&longest), Ok(()));
    }

    #[test]
    fn iscsi_names_that_break_a_rule_are_refused_with_that_rule() {
        use RuleError::*;
        let too_long = format!("iqn.2026-11.dev.discus:{}", "a".repeat(224 - 23));
        let cases: &[(&str, RuleError)] = &[
            ("", Empty),
            (&too_long, TooLong { max: 223, len: 224 }),
            ("iqn.2026-11.dev.discus:a/b", IscsiNameSlash),
            ("iqn.2026-11.dev.discus:../../core", IscsiNameSlash),
            ("iqn.2026-11.dev.discus:a..b", IscsiNameDotDot),
            ("iqn.2026-11.dev.discus:a b", IscsiNameCharacters),
            ("iqn.2026-11.dev.discus:a\tb", IscsiNameCharacters),
            ("iqn.2026-11.dev.discus:a\nb", IscsiNameCharacters),
            ("iqn.2026-11.dev.discus:é", IscsiNameCharacters),
            ("iqn.2026-11.dev.discus:Host", IscsiNameUpperCase),
            ("iqn.2026-11.dev.discus:a_b", IscsiNameFormat),
            ("iqn.2026-13.dev.discus", IscsiNameFormat),
            ("iqn.26-11.dev.discus", IscsiNameFormat),
            ("iqn.2026-11.discus", IscsiNameFormat),
            ("iqn.2026-11.dev.-discus", IscsiNameFormat),
            ("iqn.2026-11", IscsiNameFormat),
            ("target1", IscsiNameFormat),
            ("eui.02004567a425678", IscsiNameFormat),
            ("eui.02004567a425678d0", IscsiNameFormat),
            ("naa.52004567ba64678", IscsiNameFormat),
            ("naa.52004567ba64678d52004567ba64678", IscsiNameFormat),
            (".", IscsiNameFormat),
        ];
        for (name, expected) in cases {
            assert_eq!(iscsi_name(name).as_ref(), Err(expected), "{name:?}");
        }
    }

    #[test]
    fn chap_rules() {
        assert_eq!(chap_username("host-a"), Ok(()));
        assert_eq!(chap_username(""), Err(RuleError::Empty));
        assert_eq!(chap_username("a,b"), Err(RuleError::ChapUsernameComma));
        assert_eq!(chap_username("a\nb"), Err(RuleError::ControlCharacters));
        assert_eq!(chap_username("iqn.1993-08.org.debian:01:abc"), Ok(()));
        assert_eq!(chap_username("user_1@lab"), Ok(()));
        for name in [" host", "host ", "host (outgoing)", "a=b", "é"] {
            assert_eq!(
                chap_username(name),
                Err(RuleError::ChapUsernameCharacters),
                "{name:?}"
            );
        }
        assert!(matches!(
            chap_username(&"u".repeat(256)),
            Err(RuleError::TooLong { .. })
        ));
        assert_eq!(chap_username(&"u".repeat(255)), Ok(()));
        assert_eq!(chap_secret("twelve-chars"), Ok(()));
        assert_eq!(chap_secret("sixteen-chars-ok"), Ok(()));
        assert_eq!(
            chap_secret("elevenchars"),
            Err(RuleError::ChapSecretLength(11))
        );
        assert_eq!(
            chap_secret("seventeen-chars-x"),
            Err(RuleError::ChapSecretLength(17))
        );
        assert_eq!(
            chap_secret("twelve-char\n"),
            Err(RuleError::ControlCharacters)
        );
        // Characters, not bytes: the Microsoft initiator counts characters.
        assert_eq!(chap_secret("ééééééééééééé"), Ok(()));
    }

    #[test]
    fn url_rules() {
        assert!(http_url("https://images.example.com/debian.iso").is_ok());
        assert!(http_url("http://10.0.0.5:8080/a.qcow2").is_ok());
        assert_eq!(
            http_url("ftp://example.com/a.iso").err(),
            Some(RuleError::UrlScheme)
        );
        assert_eq!(
            http_url("file:///etc/shadow").err(),
            Some(RuleError::UrlScheme)
        );
        assert_eq!(
            http_url("https://user:pw@example.com/a").err(),
            Some(RuleError::UrlCredentials)
        );
        assert!(matches!(http_url("not a url"), Err(RuleError::Url(_))));
    }

    #[test]
    fn path_rules() {
        assert_eq!(node_path("/srv/images/a.iso"), Ok(()));
        assert_eq!(node_path("images/a.iso"), Err(RuleError::PathNotAbsolute));
        assert_eq!(
            node_path("/srv/images/../../etc/shadow"),
            Err(RuleError::PathDotDot)
        );
        assert_eq!(node_path("/srv/a\0b"), Err(RuleError::ControlCharacters));
        assert_eq!(node_path("/srv/..hidden"), Ok(()));
    }

    #[test]
    fn numeric_rules() {
        assert_eq!(lun(0), Ok(()));
        assert_eq!(lun(255), Ok(()));
        assert_eq!(lun(256), Err(RuleError::LunRange(256)));
        assert_eq!(grace_seconds(9), Err(RuleError::GraceSeconds(9)));
        assert_eq!(grace_seconds(86_401), Err(RuleError::GraceSeconds(86_401)));
        assert_eq!(grace_seconds(30), Ok(std::time::Duration::from_secs(30)));
        assert_eq!(block_size(2048), Ok(()));
        assert_eq!(block_size(1000), Err(RuleError::BlockSize(1000)));
        assert_eq!(port(3260), Ok(3260));
        assert_eq!(port(0), Err(RuleError::Port(0)));
        assert_eq!(port(65536), Err(RuleError::Port(65536)));
    }

    #[test]
    fn addresses_digests_names_and_times() {
        assert!(ip_address("10.0.0.1").is_ok());
        assert!(ip_address("fd00::1").is_ok());
        assert!(ip_address("storage-1").is_err());
        assert_eq!(sha256_hex(&"a".repeat(64)), Ok(()));
        assert_eq!(sha256_hex(&"A".repeat(64)), Err(RuleError::Sha256));
        assert_eq!(sha256_hex(&"a".repeat(63)), Err(RuleError::Sha256));
        assert_eq!(object_name("debian-12.iso"), Ok(()));
        assert_eq!(object_name("Debian"), Err(RuleError::DnsSubdomain));
        assert!(timestamp("2026-12-01T18:00:00Z").is_ok());
        assert!(timestamp("2026-12-01T18:00:00+02:00").is_ok());
        assert!(timestamp("2026-12-01t18:00:00.123456789z").is_ok());
        assert_eq!(
            timestamp("9999-12-31T23:59:59Z"),
            Ok(k8s_openapi::jiff::Timestamp::MAX)
        );
        for bad in [
            "tomorrow",
            "2026-12-01T18:00:00+25:00",
            "2026-12-01 18:00:00Z",
            "20261201T180000Z",
            "2026-12-01T18:00:00Z[Europe/Paris]",
            "2026-12-01T18:00:00",
            "2026-13-01T18:00:00Z",
        ] {
            assert_eq!(timestamp(bad), Err(RuleError::Timestamp), "{bad}");
        }
    }
}
