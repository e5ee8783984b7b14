//! Human sizes: bytes or K, M, G, T suffixes (powers of 1024).

/// Parses `SIZE` as bytes with an optional K/M/G/T suffix (powers of 1024, case-insensitive,
/// an optional trailing `B` or `iB` accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    // "64MiB", "64Mib" and Kubernetes' "64Mi" all mean 64 << 20.
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix("ib")).unwrap_or(t);
    let t = match t.strip_suffix('i') {
        Some(unit) if unit.ends_with(|c: char| "KMGTkmgt".contains(c)) => unit,
        _ => t,
    };
    let t = if t.len() > 1 { t.strip_suffix(['B', 'b']).unwrap_or(t) } else { t };
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} in {text:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("invalid size {text:?}"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64Mi"), Ok(64 << 20), "Kubernetes quantity");
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert!(parse_size("64i").is_err());
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
