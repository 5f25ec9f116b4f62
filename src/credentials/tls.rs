//! TLS without a CA to manage: each node makes a key and a self-signed certificate when it
//! starts (in memory only: a restart makes new ones) and publishes the certificate's SHA-256 in
//! status. A client reads that digest from the apiserver — which vouches for the node — and
//! accepts exactly that certificate, whatever name or address it carries.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the node's upload certificate: {0}")]
    Certificate(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0:?} is not a certificate fingerprint (64 hex digits)")]
    Fingerprint(String),
}

/// A node's key and self-signed certificate. Debug shows the fingerprint only.
pub struct NodeIdentity {
    certificate: CertificateDer<'static>,
    key: Vec<u8>,
    fingerprint: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// A new key and certificate for the node `name` at `addresses`.
    pub fn generate(name: &str, addresses: &[IpAddr]) -> Result<Self, TlsError> {
        let failed = |e: rcgen::Error| TlsError::Certificate(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("discus upload {name}"));
        params.subject_alt_names = (addresses.iter())
            .map(|a| rcgen::SanType::IpAddress(*a))
            .collect();
        let certificate = params.self_signed(&key).map_err(failed)?;
        let certificate = certificate.der().clone();
        Ok(Self {
            fingerprint: fingerprint(&certificate),
            certificate,
            key: key.serialize_der(),
        })
    }

    /// The certificate's SHA-256, lower-case hex: what clients pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// What the endpoint serves TLS with.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.certificate.clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 of a certificate (its DER bytes), lower-case hex.
pub fn fingerprint(certificate: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(certificate.as_ref()))
}

/// A client configuration that accepts exactly the certificate whose SHA-256 is `pinned`.
pub fn pinned_client(pinned: &str) -> Result<rustls::ClientConfig, TlsError> {
    let digest = hex::decode(pinned)
        .ok()
        .and_then(|d| <[u8; 32]>::try_from(d).ok())
        .filter(|_| pinned.len() == 64)
        .ok_or_else(|| TlsError::Fingerprint(pinned.chars().take(80).collect()))?;
    let provider = provider();
    let verifier = Arc::new(Pinned {
        digest,
        provider: Arc::clone(&provider),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Trusts one certificate, by digest; the handshake's signatures are still checked against it,
/// so only the holder of its key passes.
#[derive(Debug)]
struct Pinned {
    digest: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.digest {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_the_certificate_s_digest_and_differ_per_start() {
        let address = [IpAddr::from([127, 0, 0, 1])];
        let one = NodeIdentity::generate("n1", &address).expect("identity");
        let two = NodeIdentity::generate("n1", &address).expect("identity");
        assert_eq!(one.fingerprint(), fingerprint(&one.certificate));
        assert_eq!(one.fingerprint().len(), 64);
        assert_ne!(one.fingerprint(), two.fingerprint());
        assert!(!format!("{one:?}").contains("key"));
    }

    #[test]
    fn only_well_formed_fingerprints_are_pinned() {
        assert!(pinned_client(&"ab".repeat(32)).is_ok());
        for bad in ["", "xyz", &"ab".repeat(31), &"AB".repeat(33)] {
            assert!(pinned_client(bad).is_err(), "{bad}");
        }
    }
}
