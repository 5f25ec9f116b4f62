//! A network card's MAC address: what a machine booting through iPXE is known by (`${net0/mac}`).
//! Written in the API as six colon-separated hex pairs in either case; shown and compared in
//! lower case, as iPXE sends it.

use std::fmt;
use std::str::FromStr;

use super::rules::RuleError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// Whether the address names a group of cards, not one card (the I/G bit of the first octet).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddress {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or(RuleError::MacAddress)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RuleError::MacAddress);
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| RuleError::MacAddress)?;
        }
        if parts.next().is_some() {
            return Err(RuleError::MacAddress);
        }
        Ok(Self(octets))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_either_case_and_writes_lower_case() {
        let mac: MacAddress = "52:54:00:AB:cd:0F"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert!(!mac.is_multicast());
        assert!(
            "01:00:5e:00:00:01"
                .parse::<MacAddress>()
                .is_ok_and(|m| m.is_multicast())
        );
    }

    #[test]
    fn refuses_what_is_not_six_hex_pairs() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52-54-00-ab-cd-0f",
            "5254.00ab.cd0f",
            "52:54:00:ab:cd:0g",
            "52:54:00:ab:cd:f",
            "52:54:00:ab:cd:+f",
            " 52:54:00:ab:cd:0f",
        ] {
            assert_eq!(
                bad.parse::<MacAddress>(),
                Err(RuleError::MacAddress),
                "{bad:?}"
            );
        }
    }
}
