//! The connecting client: what the MTA reported at connect, and what the site facts say of it.

use crate::services::{
    net::looks_dynamic,
    site::{Site, is_localhost, verified_ptr},
};
use indymilter::SocketInfo;
use std::net::IpAddr;

/// The connecting client, as the MTA reported it at connect.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The client's host name as the MTA resolved it (`[ip]` when it has none).
    pub hostname: String,
    /// The client's IP address, when it connected over IP.
    pub ip: Option<IpAddr>,
    /// The client's port.
    pub port: Option<u16>,
    /// "inet", "inet6", "unix" or "unknown".
    pub family: &'static str,
    /// The socket path for unix clients.
    pub path: Option<String>,
    /// In `[site] internal_networks`, or authenticated with SMTP AUTH.
    pub internal: bool,
    /// A `[site] trusted_relays` host.
    pub trusted: bool,
    /// This host (127.0.0.0/8, ::1): never a zombie.
    pub localhost: bool,
    /// The session authenticated with SMTP AUTH (known from MAIL on).
    pub authenticated: bool,
    /// The MTA's verified client name, `None` when it has none.
    pub ptr: Option<String>,
    /// Whether the name looks dynamic, once asked ([`ClientInfo::dynamic`]).
    dynamic: Option<bool>,
}

impl Default for ClientInfo {
    /// A client the MTA has not described (yet).
    fn default() -> ClientInfo {
        ClientInfo {
            hostname: String::new(),
            ip: None,
            port: None,
            family: "unknown",
            path: None,
            internal: false,
            trusted: false,
            localhost: false,
            authenticated: false,
            ptr: None,
            dynamic: None,
        }
    }
}

impl ClientInfo {
    /// The client the MTA announced at connect, classified by the site facts.
    pub fn from_connect(hostname: String, socket: SocketInfo, site: &Site) -> ClientInfo {
        let mut client = ClientInfo {
            ptr: verified_ptr(&hostname),
            hostname,
            ..ClientInfo::default()
        };
        match socket {
            SocketInfo::Inet(addr) => {
                let ip = addr.ip();
                client.ip = Some(ip);
                client.port = Some(addr.port());
                client.family = if addr.is_ipv4() { "inet" } else { "inet6" };
                client.internal = site.internal(ip);
                client.trusted = site.trusted(ip);
                client.localhost = is_localhost(ip);
            }
            SocketInfo::Unix(path) => {
                client.family = "unix";
                client.path = Some(path.to_string_lossy().into_owned());
            }
            SocketInfo::Unknown => {}
        }
        client
    }

    /// No verified name, or one that looks like a dynamic address pool's (false for a client
    /// without an IP address). Worked out when first asked: most policies never do.
    pub fn dynamic(&mut self) -> bool {
        let (ip, ptr) = (self.ip, self.ptr.as_deref());
        *self.dynamic.get_or_insert_with(|| {
            ip.is_some_and(|ip| ptr.is_none_or(|ptr| looks_dynamic(ptr, ip)))
        })
    }

    /// The client for log lines: its IP, else its host name, else "-".
    pub fn label(&self) -> String {
        match (self.ip, self.hostname.as_str()) {
            (Some(ip), _) => ip.to_string(),
            (None, "") => "-".to_string(),
            (None, name) => name.to_string(),
        }
    }
}
