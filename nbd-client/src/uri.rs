//! NBD URIs and the backing-file strings QEMU stores: `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, the legacy `nbd:unix:PATH[:exportname=E]` /
//! `nbd:HOST:PORT[:exportname=E]`, and QEMU's `json:{...}` pseudo-protocol with an `nbd` node
//! (nested under a `raw` driver's `file`, or at the top level, with nested or dotted keys).
//! `nbds://` and `nbds+unix://` parse to [`Error::TlsUnsupported`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::Error;

/// The IANA-assigned NBD port, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A unix-domain socket path.
    Unix(PathBuf),
    /// A TCP host (name or address, IPv6 without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A parsed NBD location: server address and export name, plus the QEMU options a `json:`
/// backing string may carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uri {
    /// The server.
    pub address: Address,
    /// The export name ("" is the default export).
    pub export: String,
    /// `reconnect-delay` from a `json:` string, if present.
    pub reconnect_delay: Option<Duration>,
    /// `open-timeout` from a `json:` string, if present.
    pub open_timeout: Option<Duration>,
}

impl Uri {
    /// A unix-socket location.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Uri {
        Uri {
            address: Address::Unix(path.into()),
            export: export.into(),
            reconnect_delay: None,
            open_timeout: None,
        }
    }

    /// A TCP location.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Uri {
        Uri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            reconnect_delay: None,
            open_timeout: None,
        }
    }

    /// Whether `s` names an NBD export rather than a local file (`nbd:`, `nbd://`, `nbd+unix://`,
    /// `nbds...`, or a `json:` string with an `nbd` driver), without validating it: lets a caller
    /// decide which of [`Uri::parse`] or a file open should report the error.
    pub fn is_nbd_string(s: &str) -> bool {
        if let Some(json) = s.strip_prefix("json:") {
            return json.contains("\"nbd\"");
        }
        s.starts_with("nbd:")
            || s.starts_with("nbd+")
            || s.starts_with("nbds:")
            || s.starts_with("nbds+")
    }

    /// Parse any of the accepted forms (see the module documentation).
    pub fn parse(s: &str) -> Result<Uri, Error> {
        let bad = |reason: &str| Error::InvalidUri {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(json) = s.strip_prefix("json:") {
            return parse_json(s, json);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            if let Some(legacy) = s.strip_prefix("nbd:") {
                return parse_legacy(s, legacy);
            }
            return Err(bad("expected nbd://, nbd+unix://, nbd: or json:"));
        };
        match scheme {
            "nbds" | "nbds+unix" | "nbds+tcp" | "nbds+vsock" => {
                return Err(Error::TlsUnsupported { uri: s.to_string() })
            }
            "nbd" | "nbd+tcp" | "nbd+unix" => {}
            _ => return Err(bad("unknown scheme")),
        }
        if rest.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| bad("bad percent-encoding in export"))?;
        let mut socket = None;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "socket" if scheme == "nbd+unix" && socket.is_none() => {
                    socket = Some(
                        percent_decode(v).ok_or_else(|| bad("bad percent-encoding in socket"))?,
                    )
                }
                "tls-type" | "tls-hostname" | "tls-verify-peer" | "tls-psk-file"
                | "tls-certificates" => return Err(Error::TlsUnsupported { uri: s.to_string() }),
                _ => return Err(bad("unsupported query parameter")),
            }
        }
        let address = if scheme == "nbd+unix" {
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host or port"));
            }
            let socket = socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
            if socket.is_empty() {
                return Err(bad("empty socket path"));
            }
            Address::Unix(PathBuf::from(socket))
        } else {
            let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Address::Tcp {
                host,
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(Uri {
            address,
            export,
            reconnect_delay: None,
            open_timeout: None,
        })
    }

    /// The string QEMU writes as a backing file name for this location (and accepts back):
    /// `nbd+unix:///EXPORT?socket=PATH`, `nbd+unix://?socket=PATH` or `nbd://HOST:PORT/EXPORT`.
    pub fn to_qemu_string(&self) -> String {
        let export = percent_encode(&self.export, false);
        match &self.address {
            Address::Unix(p) => {
                let socket = percent_encode(&p.to_string_lossy(), true);
                if self.export.is_empty() {
                    format!("nbd+unix://?socket={socket}")
                } else {
                    format!("nbd+unix:///{export}?socket={socket}")
                }
            }
            Address::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                if self.export.is_empty() {
                    format!("nbd://{host}:{port}")
                } else {
                    format!("nbd://{host}:{port}/{export}")
                }
            }
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_qemu_string())
    }
}

impl std::str::FromStr for Uri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Uri, Error> {
        Uri::parse(s)
    }
}

fn split_host_port(a: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((a.to_string(), None)),
    }
}

fn parse_legacy(whole: &str, s: &str) -> Result<Uri, Error> {
    let bad = |reason: &str| Error::InvalidUri {
        uri: whole.to_string(),
        reason: reason.to_string(),
    };
    let (main, export) = match s.split_once(":exportname=") {
        Some((m, e)) => (m, e.to_string()),
        None => (s, String::new()),
    };
    if let Some(path) = main.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("empty socket path"));
        }
        return Ok(Uri::unix(path, export));
    }
    let (host, port) = main
        .rsplit_once(':')
        .ok_or_else(|| bad("expected nbd:HOST:PORT"))?;
    let port = port.parse().map_err(|_| bad("bad port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok(Uri::tcp(
        host.trim_start_matches('[').trim_end_matches(']'),
        port,
        export,
    ))
}

/// Expand QEMU's dotted keys (`"file.server.path": "x"`) into nested objects.
fn expand_dotted(map: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in map {
        let v = match v {
            Value::Object(m) => Value::Object(expand_dotted(m)),
            other => other.clone(),
        };
        let mut parts = k.split('.').collect::<Vec<_>>();
        let last = parts.pop().unwrap_or_default();
        let mut cur = &mut out;
        for p in parts {
            let entry = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            let Value::Object(m) = entry else {
                unreachable!("just made an object")
            };
            cur = m;
        }
        match (cur.get_mut(last), v) {
            (Some(Value::Object(existing)), Value::Object(new)) => existing.extend(new),
            (_, v) => {
                cur.insert(last.to_string(), v);
            }
        }
    }
    out
}

fn parse_json(whole: &str, json: &str) -> Result<Uri, Error> {
    let bad = |reason: &str| Error::InvalidUri {
        uri: whole.to_string(),
        reason: reason.to_string(),
    };
    let v: Value = serde_json::from_str(json).map_err(|e| bad(&format!("bad JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(bad("JSON is not an object"));
    };
    let mut node = expand_dotted(&map);
    // Descend through format drivers (`raw`) to the protocol node.
    for _ in 0..4 {
        match node.get("driver").and_then(Value::as_str) {
            Some("nbd") => return parse_json_nbd(whole, &node),
            Some("raw") | None => match node.get("file") {
                Some(Value::Object(f)) => node = f.clone(),
                Some(Value::String(s)) => return Uri::parse(s),
                _ => return Err(bad("no nbd node (expected \"driver\":\"nbd\")")),
            },
            Some(_) => return Err(bad("only the raw driver over an nbd node is supported")),
        }
    }
    Err(bad("nbd node nested too deeply"))
}

fn json_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn json_secs(v: Option<&Value>) -> Option<Duration> {
    v.and_then(json_str)
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn parse_json_nbd(whole: &str, node: &Map<String, Value>) -> Result<Uri, Error> {
    let bad = |reason: &str| Error::InvalidUri {
        uri: whole.to_string(),
        reason: reason.to_string(),
    };
    if node.contains_key("tls-creds") {
        return Err(Error::TlsUnsupported {
            uri: whole.to_string(),
        });
    }
    let export = node.get("export").and_then(json_str).unwrap_or_default();
    let address = if let Some(Value::Object(server)) = node.get("server") {
        match server.get("type").and_then(Value::as_str) {
            Some("unix") => {
                let path = server
                    .get("path")
                    .and_then(json_str)
                    .ok_or_else(|| bad("unix server needs path"))?;
                Address::Unix(PathBuf::from(path))
            }
            Some("inet") => {
                let host = server
                    .get("host")
                    .and_then(json_str)
                    .ok_or_else(|| bad("inet server needs host"))?;
                let port = match server.get("port").and_then(json_str) {
                    Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                    None => DEFAULT_PORT,
                };
                Address::Tcp { host, port }
            }
            _ => return Err(bad("server type must be unix or inet")),
        }
    } else if let Some(path) = node.get("path").and_then(json_str) {
        Address::Unix(PathBuf::from(path))
    } else if let Some(host) = node.get("host").and_then(json_str) {
        let port = match node.get("port").and_then(json_str) {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => DEFAULT_PORT,
        };
        Address::Tcp { host, port }
    } else {
        return Err(bad("nbd node without server"));
    };
    Ok(Uri {
        address,
        export,
        reconnect_delay: json_secs(node.get("reconnect-delay")),
        open_timeout: json_secs(node.get("open-timeout")),
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        let keep = c.is_ascii_alphanumeric()
            || b"-._~!$'()*+,;:@".contains(&c)
            || (c == b'/' && keep_slash);
        if keep {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_forms() {
        let u = Uri::parse("nbd://example.org:1234/disk").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "example.org".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "disk");
        assert_eq!(u.to_qemu_string(), "nbd://example.org:1234/disk");
        let u = Uri::parse("nbd://127.0.0.1").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u = Uri::parse("nbd://[::1]:99//abs%20name").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(u.export, "/abs name");
        assert_eq!(Uri::parse(&u.to_qemu_string()).unwrap(), u);
    }

    #[test]
    fn unix_forms() {
        let u = Uri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u, Uri::unix("/tmp/s.sock", "exp"));
        assert_eq!(u.to_qemu_string(), "nbd+unix:///exp?socket=/tmp/s.sock");
        let u = Uri::parse("nbd+unix://?socket=/tmp/a%20b").unwrap();
        assert_eq!(u, Uri::unix("/tmp/a b", ""));
        assert_eq!(u.to_qemu_string(), "nbd+unix://?socket=/tmp/a%20b");
        assert!(Uri::parse("nbd+unix:///exp").is_err());
        assert!(Uri::parse("nbd+unix://host/exp?socket=/s").is_err());
        assert!(Uri::parse("nbd+unix:///exp?socket=/s&foo=1").is_err());
        assert!(Uri::parse("nbd://h/exp?socket=/s").is_err());
    }

    #[test]
    fn tls_is_refused_clearly() {
        for s in [
            "nbds://h/e",
            "nbds+unix:///e?socket=/s",
            "nbd://h/e?tls-type=x509",
        ] {
            let e = Uri::parse(s).unwrap_err();
            assert!(matches!(e, Error::TlsUnsupported { .. }), "{s}: {e}");
            assert!(e.to_string().contains("TLS is not supported"));
        }
    }

    #[test]
    fn legacy_forms() {
        assert_eq!(
            Uri::parse("nbd:unix:/s:exportname=e").unwrap(),
            Uri::unix("/s", "e")
        );
        assert_eq!(
            Uri::parse("nbd:localhost:10810").unwrap(),
            Uri::tcp("localhost", 10810, "")
        );
    }

    #[test]
    fn qemu_json_forms() {
        let s = r#"json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"/run/s"},"reconnect-delay":15,"open-timeout":10}}"#;
        let u = Uri::parse(s).unwrap();
        assert_eq!(u.address, Address::Unix("/run/s".into()));
        assert_eq!(u.export, "");
        assert_eq!(u.reconnect_delay, Some(Duration::from_secs(15)));
        assert_eq!(u.open_timeout, Some(Duration::from_secs(10)));
        let s = r#"json:{"driver":"nbd","server":{"type":"inet","host":"10.0.0.1","port":"10810"},"export":"vda"}"#;
        assert_eq!(Uri::parse(s).unwrap(), Uri::tcp("10.0.0.1", 10810, "vda"));
        let s = r#"json:{"file.driver":"nbd","file.server.type":"unix","file.server.path":"/p","file.export":"x"}"#;
        assert_eq!(Uri::parse(s).unwrap(), Uri::unix("/p", "x"));
        let s = r#"json:{"driver":"nbd","server":{"type":"unix","path":"/p"},"tls-creds":"tls0"}"#;
        assert!(matches!(Uri::parse(s), Err(Error::TlsUnsupported { .. })));
        assert!(
            Uri::parse(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"x"}}"#)
                .is_err()
        );
        assert!(Uri::parse("json:[1]").is_err());
    }

    #[test]
    fn nbd_strings_are_recognised() {
        for s in [
            "nbd://h/e",
            "nbd+unix:///e?socket=/s",
            "nbd:unix:/s",
            "nbds://h",
            r#"json:{"driver":"nbd"}"#,
        ] {
            assert!(Uri::is_nbd_string(s), "{s}");
        }
        for s in [
            "/var/img.raw",
            "disk.qed",
            "nbdfile",
            r#"json:{"driver":"file","filename":"x"}"#,
        ] {
            assert!(!Uri::is_nbd_string(s), "{s}");
        }
    }

    #[test]
    fn garbage_is_invalid() {
        for s in [
            "",
            "http://x/y",
            "nbd://",
            "nbd://h:notaport/e",
            "nbd:unix:",
            "json:{",
        ] {
            assert!(
                matches!(Uri::parse(s), Err(Error::InvalidUri { .. })),
                "{s}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn qemu_string_round_trips_unix(export in "[ -~]{0,24}", path in "/[ -~]{1,40}") {
            let u = Uri::unix(path.as_str(), export.as_str());
            proptest::prop_assert_eq!(Uri::parse(&u.to_qemu_string()).unwrap(), u);
        }

        #[test]
        fn qemu_string_round_trips_tcp(export in "[ -~]{0,24}", host in "[a-z][a-z0-9.-]{0,20}", port in 1u16..) {
            let u = Uri::tcp(host.as_str(), port, export.as_str());
            proptest::prop_assert_eq!(Uri::parse(&u.to_qemu_string()).unwrap(), u);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Uri::parse(&s);
        }
    }
}
