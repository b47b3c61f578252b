//! Who is asking: the client's address, attached to every request by the doors
//! (as a request extension) so handlers can bound what one client may hold.

use std::net::SocketAddr;

/// The address of the connection a request came on (for intercepted TLS, the
/// connection that carried it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client(pub SocketAddr);

impl Client {
    /// The client of `req`, if a door attached one (requests built in tests may not).
    pub fn of<B>(req: &http::Request<B>) -> Option<Client> {
        req.extensions().get::<Client>().copied()
    }
}
