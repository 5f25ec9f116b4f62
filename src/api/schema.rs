//! The OpenAPI schemas of leaf fields, with the same rules as `rules.rs` stated for the apiserver.
//!
//! Rules are CEL expressions with the message of the matching [`RuleError`], so the apiserver and
//! `discus validate` say the same thing about the same mistake. Every string has a `maxLength` and
//! every list a `maxItems`: the apiserver refuses CEL rules whose estimated cost is unbounded.

use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

use super::rules::{self, RuleError};

fn rule(rule: &str, message: &RuleError) -> Value {
    json!({ "rule": rule, "message": message.to_string() })
}

fn matches(pattern: &str, message: &RuleError) -> Value {
    rule(&format!("self.matches('{pattern}')"), message)
}

/// An iSCSI name: `spec.iqn`, `spec.initiatorIqn`.
pub fn iscsi_name(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": rules::ISCSI_NAME_MAX_BYTES,
        "x-kubernetes-validations": [
            rule("!self.contains('/')", &RuleError::IscsiNameSlash),
            rule("!self.contains('..')", &RuleError::IscsiNameDotDot),
            matches("^[!-~]*$", &RuleError::IscsiNameCharacters),
            rule("!self.matches('[A-Z]')", &RuleError::IscsiNameUpperCase),
            rule(
                &format!(
                    "self.matches('{}') || self.matches('{}') || self.matches('{}')",
                    rules::IQN_PATTERN,
                    rules::EUI_PATTERN,
                    rules::NAA_PATTERN
                ),
                &RuleError::IscsiNameFormat
            ),
        ],
    })
}

pub fn sha256(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [matches(rules::SHA256_PATTERN, &RuleError::Sha256)],
    })
}

/// The name of another object in the same namespace.
pub fn object_name(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": rules::DNS_SUBDOMAIN_MAX_BYTES,
        "x-kubernetes-validations": [matches(rules::DNS_SUBDOMAIN_PATTERN, &RuleError::DnsSubdomain)],
    })
}

pub fn http_url(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": rules::URL_MAX_BYTES,
        "x-kubernetes-validations": [
            rule("isURL(self) && url(self).getScheme() in ['http', 'https']", &RuleError::UrlScheme),
            rule("!isURL(self) || url(self).getHost() != ''", &RuleError::UrlHost),
            rule("!self.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@')", &RuleError::UrlCredentials),
        ],
    })
}

pub fn node_path(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": rules::PATH_MAX_BYTES,
        "x-kubernetes-validations": [
            rule("self.startsWith('/')", &RuleError::PathNotAbsolute),
            rule("!self.matches('[[:cntrl:]]')", &RuleError::ControlCharacters),
            rule("!self.matches('(^|/)[.][.](/|$)')", &RuleError::PathDotDot),
        ],
    })
}

pub fn lun(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "minimum": 0, "maximum": rules::MAX_LUN })
}

pub fn grace_seconds(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "integer",
        "minimum": rules::MIN_GRACE_SECONDS,
        "maximum": rules::MAX_GRACE_SECONDS,
    })
}

pub fn luns(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": rules::MAX_LUN + 1,
        "x-kubernetes-list-type": "set",
        "items": { "type": "integer", "minimum": 0, "maximum": rules::MAX_LUN },
    })
}

pub fn block_size(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "enum": rules::BLOCK_SIZES })
}

pub fn ip_address(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 45,
        "x-kubernetes-validations": [
            rule("isIP(self)", &RuleError::IpAddress),
        ],
    })
}

pub fn port(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "minimum": 1, "maximum": 65535, "default": rules::DEFAULT_ISCSI_PORT })
}

pub fn timestamp(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "format": "date-time",
        "maxLength": 64,
        "pattern": rules::RFC3339_PATTERN,
    })
}

/// A positive size in bytes as a quantity (`20Gi`).
pub fn byte_quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{ "type": "integer" }, { "type": "string", "maxLength": 64 }],
        "x-kubernetes-validations": [{
            "rule": "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))",
            "message": "must be a positive size such as 20Gi, 4G or 1073741824",
        }],
    })
}

/// `spec.boot.macAddresses`: one network card each, listed once.
pub fn mac_addresses(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": rules::MAX_BOOT_MACS,
        "x-kubernetes-list-type": "set",
        // `set` refuses the same string twice; a card is the same in either case.
        "x-kubernetes-validations": [rule(
            "self.all(m, self.filter(n, n.lowerAscii() == m.lowerAscii()).size() == 1)",
            &RuleError::MacTwice
        )],
        "items": {
            "type": "string",
            "maxLength": 17,
            "x-kubernetes-validations": [
                matches(rules::MAC_ADDRESS_PATTERN, &RuleError::MacAddress),
                rule(
                    "!self.matches('^[0-9A-Fa-f]{2}') || !(self.substring(1, 2) in \
                     ['1', '3', '5', '7', '9', 'b', 'd', 'f', 'B', 'D', 'F'])",
                    &RuleError::MacMulticast
                ),
            ],
        },
    })
}

/// Networks in CIDR notation (`spec.boot.sourceCidrs`).
pub fn cidrs(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": rules::MAX_BOOT_SOURCES,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": 49,
            "x-kubernetes-validations": [
                rule("isCIDR(self) && cidr(self).masked() == cidr(self)", &RuleError::Cidr),
            ],
        },
    })
}
