//! SPIFFE IDs, parsed strictly by the SPIFFE ID standard: one definition
//! shared by config validation and the identity filter.

use std::fmt;
use std::sync::Arc;

/// Longest SPIFFE ID accepted, in bytes (SPIFFE ID standard, section 2.3).
const MAX_LEN: usize = 2048;

/// A valid SPIFFE ID that names a workload: `spiffe://trust-domain/path`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: Arc<str>,
    /// Byte length of the trust domain, which starts after `spiffe://`.
    trust_domain_len: usize,
}

impl SpiffeId {
    /// Parses a workload SPIFFE ID. Refused: another scheme, upper case in
    /// the scheme or trust domain, a port, user info, a query or fragment,
    /// percent-encoding, empty, `.` or `..` segments, a trailing `/`, and an
    /// ID with no path (that names a trust domain, not a workload).
    pub fn parse(text: &str) -> Result<SpiffeId, String> {
        if text.len() > MAX_LEN {
            return Err(format!("SPIFFE ID is longer than {MAX_LEN} bytes"));
        }
        let Some(rest) = text.strip_prefix("spiffe://") else {
            return Err(format!(
                "`{text}` is not a SPIFFE ID (`spiffe://trust-domain/path`)"
            ));
        };
        let (trust_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        check_trust_domain(trust_domain).map_err(|e| format!("in `{text}`: {e}"))?;
        if path.is_empty() || path == "/" {
            return Err(format!("`{text}` names a trust domain, not a workload"));
        }
        for segment in path[1..].split('/') {
            match segment {
                "" => {
                    return Err(format!(
                        "`{text}` has an empty path segment or a trailing `/`"
                    ))
                }
                "." | ".." => return Err(format!("`{text}` has a `.` or `..` path segment")),
                s => {
                    if let Some(bad) = s
                        .chars()
                        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                    {
                        return Err(format!(
                            "`{text}` contains `{bad}` in its path; only letters, digits, `.`, `-` and `_` are allowed"
                        ));
                    }
                }
            }
        }
        Ok(SpiffeId {
            id: text.into(),
            trust_domain_len: trust_domain.len(),
        })
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len().."spiffe://".len() + self.trust_domain_len]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The whole ID, shared.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

/// Checks a trust domain name: lowercase letters, digits, `.`, `-` and `_`.
pub fn check_trust_domain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("trust domain name is empty".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "trust domain `{name}` contains `{bad}`; only lowercase letters, digits, `.`, `-` and `_` are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_name_their_trust_domain() {
        for (text, td) in [
            ("spiffe://example.org/agent", "example.org"),
            (
                "spiffe://prod.acme-1_x/ns/agents/sa/triage.bot",
                "prod.acme-1_x",
            ),
        ] {
            let id = SpiffeId::parse(text).expect(text);
            assert_eq!(id.trust_domain(), td);
            assert_eq!(id.as_str(), text);
        }
    }

    #[test]
    fn malformed_ids_are_refused() {
        for text in [
            "",
            "https://example.org/agent",
            "SPIFFE://example.org/agent",
            "spiffe://Example.org/agent",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org:443/agent",
            "spiffe://user@example.org/agent",
            "spiffe://example.org/agent/",
            "spiffe://example.org//agent",
            "spiffe://example.org/./agent",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/agent?x=1",
            "spiffe://example.org/agent#frag",
            "spiffe://example.org/a%2Fb",
            "spiffe:///agent",
        ] {
            assert!(SpiffeId::parse(text).is_err(), "accepted {text:?}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_LEN));
        assert!(SpiffeId::parse(&long).is_err());
    }
}
