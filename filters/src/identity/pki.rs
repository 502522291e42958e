//! A throwaway SPIFFE certificate authority, for `tether demo` and tests:
//! a CA per trust domain that issues X.509-SVIDs and server certificates,
//! generated in memory. Not for production identities: use SPIRE or
//! cert-manager for those.
//!
//! Not in the testkit, as the demo ships it; and here rather than beside
//! the demo, as this crate's own TLS tests need a CA. It forges nothing:
//! what it issues is trusted only where its bundle is installed.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

pub use rcgen::Error;

/// A CA for one trust domain.
pub struct Pki {
    /// The trust domain it vouches for.
    pub trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// An issued certificate and its private key.
pub struct Issued {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
    der: CertificateDer<'static>,
}

impl Issued {
    /// The certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
}

impl Pki {
    /// A new CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Pki, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{trust_domain} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // SPIFFE bundles name the trust domain in the CA's URI SAN.
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Pki {
            trust_domain: trust_domain.to_string(),
            issuer,
        })
    }

    /// The CA certificate, PEM: the trust bundle.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &[u8] {
        self.issuer.der()
    }

    /// A client certificate whose URI SANs are `uris` (one, for an SVID).
    pub fn leaf(&self, uris: &[&str]) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.issue(params)
    }

    /// An X.509-SVID for `id` that also carries the DNS names (or IP
    /// addresses) `names`, as a workload serving TLS under both.
    pub fn server_svid(&self, id: &str, names: &[&str]) -> Result<Issued, Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names.push(SanType::URI(id.try_into()?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.issue(params)
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Result<Issued, Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, "tether");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        })
    }
}
