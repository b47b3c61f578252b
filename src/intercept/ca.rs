//! The gateway's own certificate authority: created on first start in the data
//! dir (key file mode 0600, never served) or loaded from configured files. Its
//! certificate is name-constrained to the intercepted hosts, so a leaked key
//! cannot impersonate anything else.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, GeneralSubtree, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::CertificateDer;

/// Where a CA lives on disk.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// The default place in the data dir.
    pub fn in_data_dir(data_dir: &Path) -> CaFiles {
        let dir = data_dir.join("ca");
        CaFiles {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
        }
    }
}

/// A loaded CA, ready to sign leaf certificates.
pub struct Ca {
    pub files: CaFiles,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
    /// DNS subtrees the certificate is constrained to (`None`: unconstrained).
    pub permitted: Option<Vec<String>>,
}

impl Ca {
    /// Load the CA at `files`, or create one constrained to `hosts` when `create` is
    /// allowed and neither file exists.
    pub fn load_or_create(files: &CaFiles, hosts: &[String], create: bool) -> anyhow::Result<Ca> {
        match (files.cert.exists(), files.key.exists()) {
            (true, true) => Ca::load(files),
            (false, false) if create => Ca::create(files, hosts),
            // Another process may be between writing the key and the certificate.
            (false, true) if create => Ca::load_when_complete(files),
            (false, false) => bail!(
                "CA certificate {} and key {} do not exist",
                files.cert.display(),
                files.key.display()
            ),
            _ => bail!(
                "only one of the CA files exists ({} and {}); restore the other or remove both to make a new CA",
                files.cert.display(),
                files.key.display()
            ),
        }
    }

    /// Another process is creating this CA: wait (briefly) for its certificate.
    fn load_when_complete(files: &CaFiles) -> anyhow::Result<Ca> {
        for _ in 0..100 {
            if files.cert.exists() {
                return Ca::load(files);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!(
            "{} exists without {}: another process died creating the CA; remove both to make a new one",
            files.key.display(),
            files.cert.display()
        )
    }

    fn load(files: &CaFiles) -> anyhow::Result<Ca> {
        let cert_pem = std::fs::read_to_string(&files.cert)
            .with_context(|| format!("could not read CA certificate {}", files.cert.display()))?;
        let key_pem = std::fs::read_to_string(&files.key)
            .with_context(|| format!("could not read CA key {}", files.key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("CA key {} is not usable", files.key.display()))?;
        let cert_der = pem::parse(&cert_pem)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| CertificateDer::from(p.into_contents()))
            .with_context(|| format!("{} holds no PEM certificate", files.cert.display()))?;
        let permitted = permitted_dns_subtrees(&cert_der)
            .with_context(|| format!("CA certificate {} is not usable", files.cert.display()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .with_context(|| format!("CA certificate {} is not usable", files.cert.display()))?;
        Ok(Ca {
            files: files.clone(),
            cert_pem,
            cert_der,
            issuer,
            permitted,
        })
    }

    fn create(files: &CaFiles, hosts: &[String]) -> anyhow::Result<Ca> {
        if hosts.is_empty() {
            bail!("no intercepted hosts to constrain a new CA to");
        }
        let key = KeyPair::generate().context("could not generate the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "moonbit-registry interception CA");
        dn.push(DnType::OrganizationName, "moonbit-registry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // RFC 5280: a DNS subtree permits the name and its subdomains, nothing else.
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: hosts
                .iter()
                .map(|h| GeneralSubtree::DnsName(h.clone()))
                .collect(),
            excluded_subtrees: Vec::new(),
        });
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .context("could not sign the CA certificate")?;

        let dir = files.cert.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        // The key goes first, created 0600 under a unique temp name and never over an
        // existing one: a concurrent start that lost the race loads the winner's CA.
        let key_file = temp_with(dir, key.serialize_pem().as_bytes())?;
        if let Err(e) = key_file.persist_noclobber(&files.key) {
            if e.error.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e.error)
                    .with_context(|| format!("could not write {}", files.key.display()));
            }
            return Ca::load_when_complete(files);
        }
        let cert_file = temp_with(dir, cert.pem().as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = cert_file
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644));
        }
        cert_file
            .persist(&files.cert)
            .map_err(|e| e.error)
            .with_context(|| format!("could not write {}", files.cert.display()))?;
        tracing::info!(cert = %files.cert.display(), hosts = ?hosts, "created the interception CA");
        Ok(Ca {
            files: files.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            permitted: Some(hosts.to_vec()),
        })
    }

    /// Whether clients that honour name constraints will accept a leaf for `host`.
    pub fn covers(&self, host: &str) -> bool {
        match &self.permitted {
            None => true,
            Some(subtrees) => subtrees
                .iter()
                .any(|s| host == s || host.ends_with(&format!(".{}", s.trim_start_matches('.')))),
        }
    }
}

/// The DNS names a CA certificate's name constraints permit (`None`: no constraints).
fn permitted_dns_subtrees(der: &CertificateDer<'_>) -> anyhow::Result<Option<Vec<String>>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let constraints = cert
        .name_constraints()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(constraints
        .and_then(|nc| nc.value.permitted_subtrees.as_ref())
        .map(|subtrees| {
            subtrees
                .iter()
                .filter_map(|s| match &s.base {
                    GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        }))
}

/// A temp file in `dir` (mode 0600, as tempfile creates them) holding `bytes`, synced.
fn temp_with(dir: &Path, bytes: &[u8]) -> anyhow::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("could not create a file in {}", dir.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.as_file().sync_all())
        .with_context(|| format!("could not write in {}", dir.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_data_dir(dir.path());
        let hosts = vec!["mooncakes.io".to_string()];
        let first = Ca::load_or_create(&files, &hosts, true).unwrap();
        let again = Ca::load_or_create(&files, &hosts, true).unwrap();
        assert_eq!(first.cert_pem, again.cert_pem);
        assert!(again.covers("mooncakes.io") && again.covers("download.mooncakes.io"));
        assert!(!again.covers("example.com") && !again.covers("evilmooncakes.io"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_file(&files.key).unwrap();
        assert!(
            Ca::load_or_create(&files, &hosts, true).is_err(),
            "a lone certificate must not be replaced"
        );
    }
}
