//! NBD URIs and the backing-file strings QEMU stores: `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, the legacy `nbd:unix:PATH[:exportname=E]` /
//! `nbd:HOST:PORT[:exportname=E]`, and QEMU's `json:{...}` pseudo-protocol with an `nbd` node
//! (nested under a `raw` driver's `file`, or at the top level, with nested or dotted keys).
//!
//! TLS is asked for by `nbds://` and `nbds+unix://`, by libnbd's `tls-certificates=DIR` and
//! `tls-hostname=NAME` queries (on any scheme), and by a `json:` node's `"tls-creds"` object id
//! (with `"tls-hostname"`); [`Uri::tls`] then says so. A location that asked for TLS writes
//! itself back ([`Uri::to_qemu_string`]) as QEMU's `json:` form with a `tls-creds` id, the one
//! form QEMU opens (given `--object tls-creds-x509,id=ID,dir=DIR,endpoint=client`). TLS-PSK
//! (`tls-psk-file=`) is refused: rustls has no PSK.

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
    /// Whether the location asks for TLS, and what it says about it (`None`: plain text).
    pub tls: Option<UriTls>,
}

/// What a location that asks for TLS says about it. The credentials themselves come from
/// [`UriTls::certificates`] or else [`crate::ClientConfig::tls_creds`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UriTls {
    /// libnbd's `tls-certificates=DIR`: the credentials directory (QEMU's `tls-creds-x509`
    /// layout).
    pub certificates: Option<PathBuf>,
    /// `tls-hostname`: the name the server's certificate must carry, instead of the TCP host
    /// (and the only name checked over a unix socket).
    pub hostname: Option<String>,
    /// QEMU's `tls-creds` object id from a `json:` string (written back as given; `tls0` when
    /// none was given).
    pub creds_id: Option<String>,
}

/// The `tls-creds` object id written for a location that named none.
pub const DEFAULT_TLS_CREDS_ID: &str = "tls0";

impl UriTls {
    /// The `tls-creds` object id QEMU must be given (`--object tls-creds-x509,id=ID,...`).
    pub fn creds_id(&self) -> &str {
        self.creds_id.as_deref().unwrap_or(DEFAULT_TLS_CREDS_ID)
    }
}

impl Uri {
    /// A unix-socket location.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Uri {
        Uri {
            address: Address::Unix(path.into()),
            export: export.into(),
            reconnect_delay: None,
            open_timeout: None,
            tls: None,
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
            tls: None,
        }
    }

    /// The same location, asking for TLS (with nothing said about it yet).
    pub fn with_tls(mut self) -> Uri {
        self.tls.get_or_insert_with(UriTls::default);
        self
    }

    /// The name the server's certificate must carry: `tls-hostname` where given, else the TCP
    /// host; `None` over a unix socket without `tls-hostname` (no name is checked, as QEMU).
    pub fn tls_server_name(&self) -> Option<&str> {
        let given = self.tls.as_ref().and_then(|t| t.hostname.as_deref());
        match (&self.address, given) {
            (_, Some(name)) => Some(name),
            (Address::Tcp { host, .. }, None) => Some(host),
            (Address::Unix(_), None) => None,
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
        let (scheme, mut tls) = match scheme {
            "nbds" | "nbds+tcp" => ("nbd", Some(UriTls::default())),
            "nbds+unix" => ("nbd+unix", Some(UriTls::default())),
            "nbd" | "nbd+tcp" | "nbd+unix" => (scheme, None),
            _ => return Err(bad("unknown scheme")),
        };
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
                "tls-certificates" | "tls-hostname" | "tls-verify-peer" | "tls-psk-file" => {
                    let v = percent_decode(v).ok_or_else(|| bad("bad percent-encoding"))?;
                    tls_query(s, k, v, tls.get_or_insert_with(UriTls::default))?
                }
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
            tls,
        })
    }

    /// The string QEMU writes as a backing file name for this location (and accepts back):
    /// `nbd+unix:///EXPORT?socket=PATH`, `nbd+unix://?socket=PATH` or `nbd://HOST:PORT/EXPORT`;
    /// for a location that asks for TLS, QEMU's `json:` form with the `tls-creds` object id
    /// (and `tls-hostname`), since QEMU's NBD URIs cannot ask for TLS. The credentials
    /// directory (`tls-certificates`) is not written: QEMU takes it from the object.
    pub fn to_qemu_string(&self) -> String {
        match &self.tls {
            Some(tls) => self.to_qemu_json(tls),
            None => self.to_plain_uri(),
        }
    }

    /// `json:{"driver":"raw","file":{"driver":"nbd",...,"tls-creds":ID}}`.
    fn to_qemu_json(&self, tls: &UriTls) -> String {
        let server = match &self.address {
            Address::Unix(p) => serde_json::json!({
                "type": "unix",
                "path": p.to_string_lossy(),
            }),
            Address::Tcp { host, port } => serde_json::json!({
                "type": "inet",
                "host": host,
                "port": port.to_string(),
            }),
        };
        let mut nbd = Map::new();
        nbd.insert("driver".into(), "nbd".into());
        nbd.insert("server".into(), server);
        if !self.export.is_empty() {
            nbd.insert("export".into(), self.export.clone().into());
        }
        nbd.insert("tls-creds".into(), tls.creds_id().into());
        if let Some(h) = &tls.hostname {
            nbd.insert("tls-hostname".into(), h.clone().into());
        }
        if let Some(d) = self.reconnect_delay {
            nbd.insert("reconnect-delay".into(), d.as_secs().into());
        }
        if let Some(t) = self.open_timeout {
            nbd.insert("open-timeout".into(), t.as_secs().into());
        }
        let top = serde_json::json!({ "driver": "raw", "file": Value::Object(nbd) });
        format!("json:{top}")
    }

    /// The plain `nbd://` or `nbd+unix://` URI.
    fn to_plain_uri(&self) -> String {
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

/// The location as a URI for messages: [`Uri::to_qemu_string`] for a plain one, libnbd's
/// `nbds://` / `nbds+unix://` form (with `tls-hostname`, `tls-certificates`) for one that asks
/// for TLS; either parses back to the same location.
impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(tls) = &self.tls else {
            return f.write_str(&self.to_plain_uri());
        };
        let plain = self.to_plain_uri();
        let rest = plain.strip_prefix("nbd").unwrap_or(&plain);
        write!(f, "nbds{rest}")?;
        let mut sep = if rest.contains('?') { '&' } else { '?' };
        let queries = [
            ("tls-hostname", tls.hostname.clone()),
            (
                "tls-certificates",
                tls.certificates
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
            ),
        ];
        for (key, value) in queries {
            if let Some(v) = value {
                write!(f, "{sep}{key}={}", percent_encode(&v, true))?;
                sep = '&';
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Uri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Uri, Error> {
        Uri::parse(s)
    }
}

/// One TLS query parameter of a URI (libnbd's names).
fn tls_query(whole: &str, key: &str, value: String, tls: &mut UriTls) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidUri {
        uri: whole.to_string(),
        reason: reason.to_string(),
    };
    match key {
        "tls-certificates" if !value.is_empty() => tls.certificates = Some(value.into()),
        "tls-hostname" if !value.is_empty() => tls.hostname = Some(value),
        "tls-verify-peer" => match value.as_str() {
            "true" | "on" | "1" | "yes" => {}
            _ => return Err(bad("tls-verify-peer cannot be turned off: the server is always verified against the CA")),
        },
        "tls-psk-file" => {
            return Err(Error::TlsCreds(std::sync::Arc::new(
                nbd_tls::Error::PskUnsupported { path: value.into() },
            )))
        }
        _ => return Err(bad(&format!("{key} needs a value"))),
    }
    Ok(())
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
    let tls = json_tls(whole, node)?;
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
        tls,
    })
}

/// A `json:` nbd node's `tls-creds` (an object id) and `tls-hostname`.
fn json_tls(whole: &str, node: &Map<String, Value>) -> Result<Option<UriTls>, Error> {
    let bad = |reason: &str| Error::InvalidUri {
        uri: whole.to_string(),
        reason: reason.to_string(),
    };
    let Some(id) = node.get("tls-creds") else {
        if node.contains_key("tls-hostname") {
            return Err(bad("tls-hostname without tls-creds"));
        }
        return Ok(None);
    };
    let id = json_str(id)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("tls-creds must be an object id"))?;
    let hostname = match node.get("tls-hostname") {
        None => None,
        Some(h) => Some(
            json_str(h)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("tls-hostname must be a name"))?,
        ),
    };
    Ok(Some(UriTls {
        certificates: None,
        hostname,
        creds_id: Some(id),
    }))
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
    use std::path::Path;

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
    fn tls_schemes_and_queries_ask_for_tls() {
        let u = Uri::parse("nbds://h:99/e").unwrap();
        assert_eq!(u, Uri::tcp("h", 99, "e").with_tls());
        assert_eq!(u.tls_server_name(), Some("h"));
        let u = Uri::parse("nbds+unix:///e?socket=/s").unwrap();
        assert_eq!(u, Uri::unix("/s", "e").with_tls());
        assert_eq!(u.tls_server_name(), None);
        let u = Uri::parse(
            "nbds+unix:///e?socket=/s&tls-hostname=img.example&tls-certificates=/etc/pki/a%20b",
        )
        .unwrap();
        let tls = u.tls.as_ref().unwrap();
        assert_eq!(tls.certificates.as_deref(), Some(Path::new("/etc/pki/a b")));
        assert_eq!(u.tls_server_name(), Some("img.example"));
        assert_eq!(Uri::parse(&u.to_string()).unwrap(), u);
        // A TLS query on a plain scheme asks for TLS too (never silently plain).
        let u = Uri::parse("nbd://10.0.0.1/e?tls-certificates=/d").unwrap();
        assert!(u.tls.is_some());
        assert_eq!(u.tls_server_name(), Some("10.0.0.1"));
    }

    #[test]
    fn psk_and_unverified_tls_are_refused() {
        let e = Uri::parse("nbds://h/e?tls-psk-file=/k.psk").unwrap_err();
        assert!(matches!(e, Error::TlsCreds(_)), "{e}");
        assert!(
            e.to_string()
                .contains("TLS-PSK credentials are not supported"),
            "{e}"
        );
        let e = Uri::parse("nbds://h/e?tls-verify-peer=false").unwrap_err();
        assert!(e.to_string().contains("cannot be turned off"), "{e}");
        assert!(Uri::parse("nbds://h/e?tls-verify-peer=true").is_ok());
    }

    #[test]
    fn tls_locations_are_written_as_qemu_json() {
        let u = Uri::parse("nbds://img.example:10810/vda").unwrap();
        let s = u.to_qemu_string();
        assert_eq!(
            s,
            r#"json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"inet","host":"img.example","port":"10810"},"export":"vda","tls-creds":"tls0"}}"#
        );
        assert_eq!(
            Uri::parse(&s).unwrap().tls_server_name(),
            Some("img.example")
        );
        let mut u = Uri::parse("nbds+unix:///e?socket=/s&tls-hostname=n").unwrap();
        u.tls.as_mut().unwrap().creds_id = Some("sec0".into());
        let back = Uri::parse(&u.to_qemu_string()).unwrap();
        assert_eq!(back.address, u.address);
        assert_eq!(back.tls.as_ref().unwrap().creds_id(), "sec0");
        assert_eq!(back.tls_server_name(), Some("n"));
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
        let u = Uri::parse(s).unwrap();
        assert_eq!(u.tls.as_ref().unwrap().creds_id.as_deref(), Some("tls0"));
        assert_eq!(u.tls_server_name(), None);
        let s = r#"json:{"driver":"nbd","server":{"type":"unix","path":"/p"},"tls-hostname":"x"}"#;
        assert!(Uri::parse(s).is_err());
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
