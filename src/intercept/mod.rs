//! TLS interception of the registry hosts, for clients that reach the gateway as
//! an `HTTPS_PROXY` (`CONNECT`) or by a network redirect (transparent, SNI): the
//! gateway's own CA ([`ca`]) signs a leaf per host ([`mint`]), TLS is terminated
//! ([`tls`], with [`sni`] reading the ClientHello of redirected connections) and
//! the decrypted requests go through the same router as registry-endpoint traffic.

pub mod ca;
pub mod mint;
pub mod sni;
pub mod tls;

use std::collections::HashMap;

use crate::config::Source;
use ca::Ca;
use mint::Mint;

/// Which hosts are intercepted, for which source, and the certificates for them.
pub struct Interceptor {
    mint: Mint,
    hosts: HashMap<String, usize>,
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
