//! TLS interception of the registry hosts, for clients that reach the gateway as
//! an `HTTPS_PROXY` (`CONNECT`) or by a network redirect (transparent, SNI): which
//! hosts are intercepted for which source, the gateway's own CA ([`ca`]) and the
//! leaf it signs per host ([`mint`]). The doors terminate TLS with them
//! (`doors::tls`); the decrypted requests go through the same router as
//! registry-endpoint traffic.

pub mod ca;
pub mod mint;

use std::collections::HashMap;

use crate::config::{Config, Source};
use ca::{Ca, CaFiles};
use mint::Mint;

/// Which hosts are intercepted, for which source, and the certificates for them.
pub struct Interceptor {
    mint: Mint,
    hosts: HashMap<String, usize>,
}

/// The interception CA: the configured files, or the one in the data dir
/// (created on first use when `create`).
pub fn load_ca(config: &Config, sources: &[Source], create: bool) -> anyhow::Result<Ca> {
    let hosts = Interceptor::all_hosts(sources);
    match (&config.proxy.ca_cert, &config.proxy.ca_key) {
        (Some(cert), Some(key)) => {
            let files = CaFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            Ca::load_or_create(&files, &hosts, false)
        }
        (None, None) => Ca::load_or_create(&CaFiles::in_data_dir(&config.data_dir), &hosts, create),
        _ => anyhow::bail!("set both proxy.ca_cert and proxy.ca_key, or neither"),
    }
}

impl Interceptor {
    pub fn new(ca: Ca, sources: &[Source]) -> Interceptor {
        let mut hosts = HashMap::new();
        for (i, source) in sources.iter().enumerate() {
            for host in &source.intercept_hosts {
                if !ca.covers(host) {
                    tracing::warn!(
                        %host, ca = %ca.files.cert.display(),
                        "the CA's name constraints do not cover this intercepted host: clients will reject it; \
                         remove the CA files to have a new CA made for the configured hosts"
                    );
                }
                // The first source to claim a host answers for it.
                hosts.entry(host.clone()).or_insert(i);
            }
        }
        Interceptor {
            mint: Mint::new(ca),
            hosts,
        }
    }

    /// Every intercepted host, for the CA's name constraints.
    pub fn all_hosts(sources: &[Source]) -> Vec<String> {
        let mut hosts: Vec<String> = sources
            .iter()
            .flat_map(|s| s.intercept_hosts.clone())
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// The source that answers for `host`, if it is intercepted.
    pub fn source_for(&self, host: &str) -> Option<usize> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.get(&host).copied()
    }

    pub fn ca(&self) -> &Ca {
        self.mint.ca()
    }

    pub fn mint(&self) -> &Mint {
        &self.mint
    }
}
