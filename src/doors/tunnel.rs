//! Traffic the gateway does not intercept: `CONNECT` tunnels copied byte for byte
//! and plain-HTTP proxy requests, both allowed or refused by one [`TunnelPolicy`].
//! The default is no open relay: tunnels only when listening on loopback, and never
//! to link-local or cloud metadata addresses unless named explicitly.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{TunnelMode, TunnelSetting};

/// How long to wait for a tunnelled destination to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may be tunnelled to.
#[derive(Debug, Clone)]
pub enum TunnelPolicy {
    Allow,
    Deny,
    /// Only hosts matching one of these patterns.
    List(Vec<HostPattern>),
}

/// `example.com`, `*.example.com` (subdomains only), either with an optional `:port`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPattern {
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        let raw = raw.trim().to_ascii_lowercase();
        let (host, port) = match raw.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => (
                h.to_string(),
                Some(
                    p.parse()
                        .map_err(|_| format!("bad port in tunnel pattern `{raw}`"))?,
                ),
            ),
            _ => (raw.clone(), None),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (host, false),
        };
        if host.is_empty() {
            return Err(format!("empty host in tunnel pattern `{raw}`"));
        }
        Ok(HostPattern {
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        let host_ok = if self.wildcard {
            host.ends_with(&format!(".{}", self.host))
        } else {
            host == self.host
        };
        host_ok && self.port.is_none_or(|p| p == port)
    }

    /// Named exactly (no wildcard): the way to allow a metadata address on purpose.
    fn names(&self, host: &str) -> bool {
        !self.wildcard && self.host == host
    }
}

impl TunnelPolicy {
    /// From the config; `auto` allows tunnels only when every listener is on loopback.
    pub fn from_setting(
        setting: &TunnelSetting,
        listens_on_loopback_only: bool,
    ) -> Result<TunnelPolicy, String> {
        Ok(match setting {
            TunnelSetting::Mode(TunnelMode::Allow) => TunnelPolicy::Allow,
            TunnelSetting::Mode(TunnelMode::Deny) => TunnelPolicy::Deny,
            TunnelSetting::Mode(TunnelMode::Auto) if listens_on_loopback_only => {
                TunnelPolicy::Allow
            }
            TunnelSetting::Mode(TunnelMode::Auto) => TunnelPolicy::Deny,
            TunnelSetting::Hosts(list) => TunnelPolicy::List(
                list.iter()
                    .map(|p| HostPattern::parse(p))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Whether `host:port` may be reached at all (before resolving it).
    pub fn permits(&self, host: &str, port: u16) -> Result<(), String> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        match self {
            TunnelPolicy::Allow => Ok(()),
            TunnelPolicy::Deny => {
                Err("tunnelling is disabled on this gateway (proxy.tunnel)".into())
            }
            TunnelPolicy::List(patterns) if patterns.iter().any(|p| p.matches(&host, port)) => {
                Ok(())
            }
            TunnelPolicy::List(_) => Err(format!(
                "{host}:{port} is not in the gateway's tunnel list (proxy.tunnel)"
            )),
        }
    }

    /// Check the policy, then resolve: the addresses a tunnel to `host:port` may use.
    pub async fn admit(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        self.permits(host, port)?;
        self.resolve(host, port).await
    }

    /// Resolve `host:port` and refuse metadata and link-local destinations unless
    /// the list names that host exactly.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| format!("cannot resolve {bare}: {e}"))?
            .collect();
        let named = matches!(self, TunnelPolicy::List(p) if p.iter().any(|p| p.names(&bare.to_ascii_lowercase())));
        if !named {
            if let Some(bad) = addrs.iter().find(|a| is_metadata_or_link_local(a.ip())) {
                return Err(format!(
                    "{bare} resolves to {}, a link-local or metadata address; name it in proxy.tunnel to allow it",
                    bad.ip()
                ));
            }
        }
        if addrs.is_empty() {
            return Err(format!("{bare} has no addresses"));
        }
        Ok(addrs)
    }
}

fn is_metadata_or_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            let metadata: std::net::Ipv6Addr = "fd00:ec2::254".parse().expect("constant address");
            v6 == metadata
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

/// Connect to the first address that answers.
pub async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"),
        }
    }
    Err(last)
}

/// Copy both ways until either side closes; the bytes are never looked at.
pub async fn splice<A, B>(mut client: A, mut server: B, label: &str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => tracing::debug!(target = label, up, down, "tunnel closed"),
        Err(e) => tracing::debug!(target = label, error = %e, "tunnel ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(patterns: &[&str]) -> TunnelPolicy {
        let list = patterns.iter().map(|s| s.to_string()).collect();
        TunnelPolicy::from_setting(&TunnelSetting::Hosts(list), false).unwrap()
    }

    #[test]
    fn auto_is_no_open_relay() {
        let auto = TunnelSetting::Mode(TunnelMode::Auto);
        assert!(TunnelPolicy::from_setting(&auto, true)
            .unwrap()
            .permits("x.org", 443)
            .is_ok());
        assert!(TunnelPolicy::from_setting(&auto, false)
            .unwrap()
            .permits("x.org", 443)
            .is_err());
    }

    #[test]
    fn patterns_match_hosts_subdomains_and_ports() {
        let p = list(&["github.com", "*.example.com", "127.0.0.1:8443"]);
        assert!(p.permits("github.com", 443).is_ok());
        assert!(p.permits("GitHub.com", 22).is_ok());
        assert!(p.permits("api.github.com", 443).is_err());
        assert!(p.permits("a.example.com", 443).is_ok());
        assert!(p.permits("example.com", 443).is_err());
        assert!(p.permits("127.0.0.1", 8443).is_ok());
        assert!(p.permits("127.0.0.1", 443).is_err());
    }

    #[tokio::test]
    async fn metadata_addresses_need_an_explicit_entry() {
        let allow = TunnelPolicy::Allow;
        assert!(allow.resolve("169.254.169.254", 80).await.is_err());
        assert!(allow.resolve("[fd00:ec2::254]", 80).await.is_err());
        assert!(allow.resolve("127.0.0.1", 80).await.is_ok());
        let named = list(&["169.254.169.254"]);
        assert!(named.resolve("169.254.169.254", 80).await.is_ok());
    }
}
