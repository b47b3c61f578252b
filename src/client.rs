//! Who is asking, and whether they proved it: the client's address, which the
//! doors hand the router with every request so handlers can bound what one client
//! may hold, and the credential checks (Basic, Bearer) of the doors and the admin
//! endpoints.

use std::net::SocketAddr;

/// The address of the connection a request came on (for intercepted TLS, the
/// connection that carried it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client(pub SocketAddr);

/// Whether `value` (an `Authorization` or `Proxy-Authorization` header) carries
/// HTTP Basic credentials equal to `expected` (`user:password`).
pub fn basic_matches(value: Option<&http::HeaderValue>, expected: &str) -> bool {
    use base64::Engine;
    let given = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        });
    given.is_some_and(|g| constant_time_eq(&g, expected.as_bytes()))
}

/// Whether `value` (an `Authorization` header) is `Bearer <expected>`.
pub fn bearer_matches(value: Option<&http::HeaderValue>, expected: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .is_some_and(|token| constant_time_eq(token.trim().as_bytes(), expected.as_bytes()))
}

/// Compared in constant time so the answer's timing tells nothing about the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn credentials_match_exactly() {
        let basic = HeaderValue::from_static("Basic Y2k6c2VjcmV0"); // ci:secret
        assert!(basic_matches(Some(&basic), "ci:secret"));
        assert!(!basic_matches(Some(&basic), "ci:secreT"));
        assert!(!basic_matches(None, "ci:secret"));
        assert!(!basic_matches(
            Some(&HeaderValue::from_static("Basic !!")),
            "x"
        ));
        let bearer = HeaderValue::from_static("Bearer t0ken");
        assert!(bearer_matches(Some(&bearer), "t0ken"));
        assert!(!bearer_matches(Some(&bearer), "t0ke"));
        assert!(!bearer_matches(Some(&basic), "t0ken"));
    }
}
