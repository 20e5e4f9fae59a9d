//! Who may call the legacy endpoints: the client's real IP and the GM and GS allowlists.
//!
//! Behind nginx every peer is the proxy, so the client address comes from `X-Real-IP`, or
//! else the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy — but only
//! when the peer is a trusted proxy. From anyone else those headers are ignored: they are
//! trivially spoofed.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Bound on the server list download; a list of every game server is far smaller.
const MAX_GS_LIST_BYTES: usize = 4 * 1024 * 1024;

/// Bound on one server list download.
const GS_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a server-list download was not used.
#[derive(Debug, thiserror::Error)]
pub enum GsListError {
    #[error("cannot fetch the server list: {0}")]
    Fetch(#[from] reqwest::Error),
    #[error("the server list answered status {0}")]
    Status(u16),
    #[error("the server list: {0}")]
    Body(#[from] crate::adapters::BodyError),
}

pub struct Access {
    gm_allow: Vec<IpNet>,
    gs_allow: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
    /// IPs of the last good server list.
    gs_list: RwLock<Arc<HashSet<IpAddr>>>,
}

/// The client of a request whose trusted proxy named it unreadably: `0.0.0.0`, which only
/// an allowlist that admits every IPv4 address (`0.0.0.0/0`) holds.
pub const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

fn parse_ip(raw: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(raw).ok()?.trim().parse().ok().map(canonical)
}

/// `::ffff:1.2.3.4` from a dual-stack socket is the IPv4 client `1.2.3.4`.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn listed(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

impl Access {
    pub fn new(gm_allow: Vec<IpNet>, gs_allow: Vec<IpNet>, trusted_proxies: Vec<IpNet>) -> Self {
        Self { gm_allow, gs_allow, trusted_proxies, gs_list: RwLock::new(Arc::new(HashSet::new())) }
    }

    /// The client's address, by the trusted-proxy rule. A trusted proxy that forwards no
    /// address is the client itself (a request made on its host); one whose header cannot
    /// be read gives [`UNKNOWN_CLIENT`], which no allowlist holds unless it allows everyone,
    /// and never the proxy's own address, which may be allowlisted.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !listed(&self.trusted_proxies, peer) {
            return peer;
        }
        if let Some(real_ip) = headers.get("x-real-ip") {
            return parse_ip(real_ip.as_bytes()).unwrap_or(UNKNOWN_CLIENT);
        }
        // Byte-wise: a client may send bytes that are not text in its own entries, and the
        // proxy appends the address it saw to them.
        let entries: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .collect();
        if entries.is_empty() {
            return peer;
        }
        // From the right: each proxy appends the address it got the request from; entries
        // further left came from the client and prove nothing.
        let mut origin = UNKNOWN_CLIENT;
        for entry in entries.into_iter().rev() {
            match parse_ip(entry) {
                Some(ip) if listed(&self.trusted_proxies, ip) => origin = ip,
                Some(ip) => return ip,
                None => return UNKNOWN_CLIENT,
            }
        }
        // Only proxies named: the request began on a proxy's host.
        origin
    }

    pub fn gm_allowed(&self, ip: IpAddr) -> bool {
        listed(&self.gm_allow, ip)
    }

    pub fn gs_allowed(&self, ip: IpAddr) -> bool {
        listed(&self.gs_allow, ip) || self.gs_list.read().unwrap_or_else(|p| p.into_inner()).contains(&ip)
    }

    /// Replaces the server-list part of the GS allowlist.
    pub fn set_gs_list(&self, ips: HashSet<IpAddr>) {
        *self.gs_list.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ips);
    }

    /// Downloads the server list once; on any failure the last good list stays.
    pub async fn refresh_gs_list(&self, http: &reqwest::Client, url: &str) -> Result<usize, GsListError> {
        let response = http.get(url).timeout(GS_LIST_TIMEOUT).send().await?;
        if !response.status().is_success() {
            return Err(GsListError::Status(response.status().as_u16()));
        }
        let body = crate::adapters::read_body(response, MAX_GS_LIST_BYTES).await?;
        let ips = parse_server_list(&String::from_utf8_lossy(&body));
        let n = ips.len();
        self.set_gs_list(ips);
        Ok(n)
    }
}

/// Lines `<name> <port> <ip> <x>`, runs of spaces allowed; other lines are skipped with a
/// warning.
pub fn parse_server_list(text: &str) -> HashSet<IpAddr> {
    let mut ips = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, _, ip, _] => match ip.parse::<IpAddr>() {
                Ok(ip) => {
                    ips.insert(canonical(ip));
                }
                Err(_) => tracing::warn!(line = n + 1, "server list: bad IP, line skipped"),
            },
            _ => tracing::warn!(line = n + 1, "server list: expected `<name> <port> <ip> <x>`, line skipped"),
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &str) -> Vec<IpNet> {
        crate::config::nets("TEST", s).unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn headers_only_from_trusted_proxies() {
        let a = Access::new(vec![], vec![], nets("10.0.0.1,10.0.0.2"));
        let spoof = headers(&[("x-real-ip", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(a.client_ip("9.9.9.9".parse().unwrap(), &spoof), "9.9.9.9".parse::<IpAddr>().unwrap());
        assert_eq!(a.client_ip("10.0.0.1".parse().unwrap(), &spoof), "1.1.1.1".parse::<IpAddr>().unwrap());
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 3.3.3.3, 10.0.0.2")]);
        assert_eq!(a.client_ip("10.0.0.1".parse().unwrap(), &xff), "3.3.3.3".parse::<IpAddr>().unwrap());
        let none = headers(&[]);
        assert_eq!(a.client_ip("10.0.0.1".parse().unwrap(), &none), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            a.client_ip("::ffff:9.9.9.9".parse().unwrap(), &none),
            "9.9.9.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn unreadable_forwarding_headers_never_give_the_proxys_address() {
        let a = Access::new(vec![], vec![], nets("127.0.0.1"));
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        // A client's own entry that is not text, then the proxy's appended address.
        h.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"\xc3\xa9, 3.3.3.3").unwrap());
        assert_eq!(a.client_ip(proxy, &h), "3.3.3.3".parse::<IpAddr>().unwrap());
        let garbled = headers(&[("x-forwarded-for", "3.3.3.3, nonsense")]);
        assert_eq!(a.client_ip(proxy, &garbled), UNKNOWN_CLIENT);
        let bad_real_ip = headers(&[("x-real-ip", "nonsense"), ("x-forwarded-for", "3.3.3.3")]);
        assert_eq!(a.client_ip(proxy, &bad_real_ip), UNKNOWN_CLIENT);
        // Only proxies named: the request came from the proxy's host.
        let local = headers(&[("x-forwarded-for", "127.0.0.1")]);
        assert_eq!(a.client_ip(proxy, &local), proxy);
        let loopback_only = Access::new(nets("127.0.0.1"), vec![], nets("127.0.0.1"));
        assert!(!loopback_only.gm_allowed(UNKNOWN_CLIENT));
        let everyone = Access::new(nets("0.0.0.0/0"), vec![], nets("127.0.0.1"));
        assert!(everyone.gm_allowed(UNKNOWN_CLIENT), "an allowlist of everyone admits an unknown client too");
    }

    #[test]
    fn server_list_lines() {
        let ips = parse_server_list(
            "s1 8001 10.1.1.1 x\ns2   8002  10.1.1.2   y\nbroken line\ns3 1 not-an-ip z\n\n",
        );
        assert_eq!(ips.len(), 2);
        assert!(ips.contains(&"10.1.1.2".parse().unwrap()));
        let a = Access::new(vec![], nets("127.0.0.1"), vec![]);
        a.set_gs_list(ips);
        assert!(a.gs_allowed("10.1.1.1".parse().unwrap()));
        assert!(a.gs_allowed("127.0.0.1".parse().unwrap()));
        assert!(!a.gs_allowed("10.1.1.3".parse().unwrap()));
    }
}
