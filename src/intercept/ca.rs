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
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        write_atomic(&files.cert, cert.pem().as_bytes())?;
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

/// Write a secret: created with mode 0600 before any byte is in it.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("could not create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("could not write {}", path.display()))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("could not write {}", path.display()))
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
