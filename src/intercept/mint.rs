//! Leaf certificates for intercepted hosts, signed by the gateway's CA and kept
//! (as ready TLS server configurations) in a moka cache: concurrent first uses of
//! one host mint once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moka::sync::Cache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use super::ca::Ca;

/// How long a minted leaf is valid; it is re-minted well before (cache TTL).
const LEAF_VALIDITY_DAYS: i64 = 30;
const LEAF_CACHE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct Mint {
    ca: Ca,
    configs: Cache<String, Arc<ServerConfig>>,
}

impl Mint {
    pub fn new(ca: Ca) -> Mint {
        Mint {
            ca,
            configs: Cache::builder()
                .max_capacity(1024)
                .time_to_live(LEAF_CACHE_TTL)
                .build(),
        }
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The TLS server configuration for `host` (h2 and http/1.1 by ALPN),
    /// minting its certificate on first use.
    pub fn server_config(&self, host: &str) -> anyhow::Result<Arc<ServerConfig>> {
        self.configs
            .try_get_with(host.to_string(), || self.mint(host).map(Arc::new))
            .map_err(|e: Arc<anyhow::Error>| anyhow::anyhow!("{e:#}"))
    }

    fn mint(&self, host: &str) -> anyhow::Result<ServerConfig> {
        let key = KeyPair::generate().context("could not generate a leaf key")?;
        let mut params = CertificateParams::new(vec![host.to_string()])
            .with_context(|| format!("`{host}` is not a valid certificate name"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
        let leaf = params
            .signed_by(&key, &self.ca.issuer)
            .with_context(|| format!("could not sign a certificate for {host}"))?;
        let chain = vec![leaf.der().clone(), self.ca.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS set-up")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("TLS rejected the minted certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tracing::info!(%host, "minted an interception certificate");
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ca::{Ca, CaFiles};
    use super::*;

    #[test]
    fn concurrent_first_uses_mint_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(
            &CaFiles::in_data_dir(dir.path()),
            &["mooncakes.io".into()],
            true,
        )
        .unwrap();
        let mint = Arc::new(Mint::new(ca));
        let configs: Vec<_> = (0..8)
            .map(|_| {
                let mint = mint.clone();
                std::thread::spawn(move || mint.server_config("download.mooncakes.io").unwrap())
            })
            .map(|t| t.join().unwrap())
            .collect();
        assert!(configs.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    }
}
