//! A throwaway certificate authority and a server certificate for 127.0.0.1.
//!
//! Every `Upstream` gets its own CA, so a client only trusts it when a test
//! hands it the CA file on purpose (curl `--cacert`, git `GIT_SSL_CAINFO`,
//! the gateway's `--upstream-ca`).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The CA certificate (PEM, for clients) and a ready server configuration.
pub struct TestPki {
    /// PEM of the self-signed CA certificate; the only thing a client must trust.
    pub ca_pem: String,
    /// Server side: leaf for `127.0.0.1` and `localhost`, ALPN `h2` then `http/1.1`.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TestPki {
    pub fn generate() -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        // A name of its own: a client trusting several upstreams' CAs (OpenSSL,
        // for git) looks the issuer up by name and would try only the first.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "moonbit-registry test upstream CA {}-{n}",
                std::process::id()
            ),
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let leaf_key = KeyPair::generate().expect("generate server key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server cert params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("sign server cert with the test CA");

        let chain: Vec<CertificateDer<'static>> =
            vec![leaf_cert.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("rustls accepts the test server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        TestPki {
            ca_pem: ca_cert.pem(),
            server_config: Arc::new(config),
        }
    }
}
