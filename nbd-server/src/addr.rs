//! Where a server listens: [`ListenAddr`], parsed from the `--nbd` flag's `unix:PATH` or
//! `tcp:HOST:PORT`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// A listening address: a unix socket path or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP address (port 0: any free port, see [`crate::Listener::addr`]).
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = Error;

    /// `unix:PATH` or `tcp:HOST:PORT` (`HOST` a name, an IPv4 address or `[IPv6]`).
    fn from_str(text: &str) -> Result<ListenAddr, Error> {
        let bad = |reason| Error::InvalidAddress {
            text: text.to_string(),
            reason,
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = text.strip_prefix("tcp:") {
            let (host, port) = hostport
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            if host.is_empty() {
                return Err(bad("the host is missing (tcp:HOST:PORT)"));
            }
            port.parse::<u16>()
                .map_err(|_| bad("the port is not a port number (0 to 65535)"))?;
            let mut addrs = hostport
                .to_socket_addrs()
                .map_err(|_| bad("the host does not resolve (tcp:HOST:PORT)"))?;
            return addrs
                .next()
                .map(ListenAddr::Tcp)
                .ok_or_else(|| bad("host resolves to nothing"));
        }
        Err(bad("expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl ListenAddr {
    /// The NBD URI of export `name` at this address, as QEMU and libnbd take it.
    pub fn uri(&self, name: &str) -> String {
        match self {
            ListenAddr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            ListenAddr::Tcp(a) => format!("nbd://{a}/{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "tcp:[::1]:0".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:0".parse().unwrap())
        );
        for bad in ["", "unix:", "tcp:", "tcp:127.0.0.1", "nbd://x", "/a/b"] {
            assert!(
                matches!(bad.parse::<ListenAddr>(), Err(Error::InvalidAddress { .. })),
                "{bad:?} accepted"
            );
        }
        let a: ListenAddr = "unix:/s".parse().unwrap();
        assert_eq!(a.to_string(), "unix:/s");
        assert_eq!(a.uri(""), "nbd+unix:///?socket=/s");
    }
}
