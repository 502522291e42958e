//! X.509-SVIDs: the SPIFFE ID a certificate carries, by the X.509-SVID
//! standard: exactly one URI SAN, which is a SPIFFE ID, on a leaf that is
//! not a CA.

use tether_config::spiffe::SpiffeId;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The identity of a verified TLS peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID from the leaf's URI SAN.
    pub id: SpiffeId,
    /// When the leaf expires, in Unix seconds.
    pub not_after: i64,
    /// SHA-256 of the leaf's DER: what an RFC 8705 `cnf` `x5t#S256`
    /// binds a token to.
    pub cert_sha256: [u8; 32],
}

/// Why a certificate is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// Not DER X.509.
    #[error("certificate is not valid DER X.509")]
    Malformed,
    /// No URI SAN at all.
    #[error("certificate has no URI SAN, so no SPIFFE ID")]
    NoUri,
    /// More than one URI SAN: which one would be the identity is ambiguous.
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    ManyUris(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(String),
    /// The leaf is a CA certificate.
    #[error("leaf certificate is a CA")]
    IsCa,
    /// The leaf may sign certificates or CRLs.
    #[error("leaf certificate has keyCertSign or cRLSign key usage")]
    SigningKeyUsage,
}

impl SvidError {
    /// A short code for metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            SvidError::Malformed => "malformed",
            SvidError::NoUri => "no_spiffe_id",
            SvidError::ManyUris(_) => "many_uris",
            SvidError::NotSpiffe(_) => "not_spiffe",
            SvidError::IsCa => "leaf_is_ca",
            SvidError::SigningKeyUsage => "leaf_can_sign",
        }
    }
}

impl PeerIdentity {
    /// Extracts the identity from a DER leaf certificate.
    pub fn from_leaf_der(der: &[u8]) -> Result<PeerIdentity, SvidError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
        // Structure first: a CA or signing certificate is never an SVID.
        if let Some(bc) = cert.basic_constraints().map_err(|_| SvidError::Malformed)? {
            if bc.value.ca {
                return Err(SvidError::IsCa);
            }
        }
        if let Some(ku) = cert.key_usage().map_err(|_| SvidError::Malformed)? {
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::SigningKeyUsage);
            }
        }
        let mut uris = Vec::new();
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|_| SvidError::Malformed)?
        {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
        let uri = match uris.as_slice() {
            [] => return Err(SvidError::NoUri),
            [one] => *one,
            many => return Err(SvidError::ManyUris(many.len())),
        };
        let id = SpiffeId::parse(uri).map_err(SvidError::NotSpiffe)?;
        let mut cert_sha256 = [0; 32];
        cert_sha256.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        Ok(PeerIdentity {
            id,
            not_after: cert.validity().not_after.timestamp(),
            cert_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::pki::Pki;
    use super::*;

    #[test]
    fn an_svid_yields_its_spiffe_id() {
        let pki = Pki::new("example.org").expect("pki");
        let leaf = pki.leaf(&["spiffe://example.org/agents/a"]).expect("leaf");
        let peer = PeerIdentity::from_leaf_der(leaf.der()).expect("svid");
        assert_eq!(peer.id.as_str(), "spiffe://example.org/agents/a");
        assert!(peer.not_after > 0);
    }

    #[test]
    fn certificates_that_are_not_svids_are_refused() {
        let pki = Pki::new("example.org").expect("pki");
        for (uris, expected) in [
            (vec![], "no_spiffe_id"),
            (
                vec!["spiffe://example.org/a", "spiffe://example.org/b"],
                "many_uris",
            ),
            (vec!["https://example.org/a"], "not_spiffe"),
            (vec!["spiffe://example.org"], "not_spiffe"),
        ] {
            let leaf = pki.leaf(&uris).expect("leaf");
            let err = PeerIdentity::from_leaf_der(leaf.der()).expect_err("refused");
            assert_eq!(err.code(), expected, "{uris:?}");
        }
        assert_eq!(
            PeerIdentity::from_leaf_der(pki.ca_der())
                .expect_err("CA")
                .code(),
            "leaf_is_ca"
        );
        assert_eq!(
            PeerIdentity::from_leaf_der(b"junk")
                .expect_err("junk")
                .code(),
            "malformed"
        );
    }
}
