//! Byte sizes written as Kubernetes quantities (`20Gi`, `4G`, `1.5Ti`, `1e9`).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("must be a size such as 20Gi, 4G or 1073741824, got {0:?}")]
    Syntax(String),
    #[error("must be a whole number of bytes, got {0:?}")]
    Fraction(String),
    #[error("must be greater than zero")]
    Zero,
    #[error("is too large")]
    Overflow,
}

const BINARY: [(&str, u32); 6] = [
    ("Ki", 1),
    ("Mi", 2),
    ("Gi", 3),
    ("Ti", 4),
    ("Pi", 5),
    ("Ei", 6),
];
const DECIMAL: [(&str, u32); 6] = [
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];

/// Parses a quantity into a positive number of bytes.
pub fn parse_bytes(quantity: &Quantity) -> Result<u64, QuantityError> {
    let text = quantity.0.trim();
    let syntax = || QuantityError::Syntax(text.to_owned());
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(syntax());
    }

    // value = digits / 10^fraction_len * multiplier; computed exactly in integers.
    let digits: u128 = format!("{whole}{fraction}").parse().map_err(|_| syntax())?;
    let mut divisor: u128 = 10u128
        .checked_pow(u32::try_from(fraction.len()).map_err(|_| syntax())?)
        .ok_or(QuantityError::Overflow)?;
    let multiplier: u128 = if suffix.is_empty() {
        1
    } else if let Some((_, power)) = BINARY.iter().find(|(s, _)| *s == suffix) {
        1024u128.pow(*power)
    } else if let Some((_, power)) = DECIMAL.iter().find(|(s, _)| *s == suffix) {
        10u128.pow(*power)
    } else if suffix == "m" {
        divisor = divisor.checked_mul(1000).ok_or(QuantityError::Overflow)?;
        1
    } else if let Some(exponent) = suffix.strip_prefix(['e', 'E']) {
        let exponent: u32 = exponent.parse().map_err(|_| syntax())?;
        10u128
            .checked_pow(exponent)
            .ok_or(QuantityError::Overflow)?
    } else {
        return Err(syntax());
    };
    let scaled = digits
        .checked_mul(multiplier)
        .ok_or(QuantityError::Overflow)?;
    if scaled % divisor != 0 {
        return Err(QuantityError::Fraction(text.to_owned()));
    }
    let bytes = u64::try_from(scaled / divisor).map_err(|_| QuantityError::Overflow)?;
    if bytes == 0 {
        return Err(QuantityError::Zero);
    }
    Ok(bytes)
}

/// Formats a byte count with the largest binary suffix that keeps it exact (`2Gi`, `1536Mi`, `1000`).
pub fn format_bytes(bytes: u64) -> Quantity {
    let mut text = bytes.to_string();
    if bytes > 0 {
        for (suffix, power) in BINARY.iter().rev() {
            let unit = 1024u64.pow(*power);
            if bytes.is_multiple_of(unit) {
                text = format!("{}{suffix}", bytes / unit);
                break;
            }
        }
    }
    Quantity(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Result<u64, QuantityError> {
        parse_bytes(&Quantity(s.to_owned()))
    }

    #[test]
    fn parses_the_forms_users_write() {
        assert_eq!(bytes("1073741824"), Ok(1 << 30));
        assert_eq!(bytes("20Gi"), Ok(20 << 30));
        assert_eq!(bytes("1.5Ki"), Ok(1536));
        assert_eq!(bytes("4G"), Ok(4_000_000_000));
        assert_eq!(bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(bytes("2048000m"), Ok(2048));
        assert_eq!(bytes("8Ei"), Ok(8 << 60));
    }

    #[test]
    fn refuses_what_is_not_a_whole_positive_size() {
        assert_eq!(bytes("0"), Err(QuantityError::Zero));
        assert_eq!(bytes("1.1"), Err(QuantityError::Fraction("1.1".into())));
        assert_eq!(bytes("500m"), Err(QuantityError::Fraction("500m".into())));
        assert!(matches!(bytes("-1Gi"), Err(QuantityError::Syntax(_))));
        assert!(matches!(bytes("20GB"), Err(QuantityError::Syntax(_))));
        assert!(matches!(bytes("Gi"), Err(QuantityError::Syntax(_))));
        assert!(matches!(bytes("1.2.3"), Err(QuantityError::Syntax(_))));
        assert_eq!(bytes("16Ei"), Err(QuantityError::Overflow));
        assert_eq!(bytes("1e40"), Err(QuantityError::Overflow));
    }

    #[test]
    fn formats_exactly() {
        assert_eq!(format_bytes(2 << 30).0, "2Gi");
        assert_eq!(format_bytes(1536 << 20).0, "1536Mi");
        assert_eq!(format_bytes(1000).0, "1000");
        assert_eq!(format_bytes(0).0, "0");
        for n in [1u64, 512, 4096, 3 << 40, 123_456_789] {
            assert_eq!(parse_bytes(&format_bytes(n)), Ok(n));
        }
    }
}
