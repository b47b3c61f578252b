//! CA bundles for tools that take one file of trusted certificates (git's
//! `http.sslCAInfo`, `SSL_CERT_FILE` for moon): the system roots plus one more CA.

use std::path::Path;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Write a PEM bundle of the system roots plus `extra_ca` to `out`, for tools that
/// take one file of trusted CAs (git's `http.sslCAInfo`).
pub fn write_ca_bundle(extra_ca: &Path, out: &Path) -> anyhow::Result<()> {
    let mut pems: Vec<pem::Pem> = rustls_native_certs::load_native_certs()
        .certs
        .into_iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
        .collect();
    for cert in CertificateDer::pem_file_iter(extra_ca)
        .with_context(|| format!("could not read CA {}", extra_ca.display()))?
    {
        let cert = cert.with_context(|| format!("could not read CA {}", extra_ca.display()))?;
        pems.push(pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()));
    }
    // SSL_CERT_FILE may already point at an earlier bundle: keep each CA once.
    let mut seen = std::collections::HashSet::new();
    pems.retain(|p| seen.insert(p.contents().to_vec()));
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, pem::encode_many(&pems))
        .and_then(|_| std::fs::rename(&tmp, out))
        .with_context(|| format!("could not write {}", out.display()))
}
