//! QMP on a unix socket: the greeting, capabilities negotiation, bounded JSON input, replies
//! with the command's `id`, and events to every negotiated client.
//!
//! Each client is served by a task of its own, which reads commands and writes their replies
//! and the events in between (a client that stops reading holds up only itself). Input is
//! parsed as a stream of JSON objects (QMP needs no newlines); at most [`MAX_INPUT`] bytes of
//! one unfinished object are buffered, past that the client gets an error and is
//! disconnected. Text that is not JSON gets a `GenericError` and is dropped up to the next
//! newline. At most [`MAX_CLIENTS`] clients are connected at once; more are turned away.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use super::{commands, Control, ControlError};
use crate::error::{Error, Result};

/// The largest unfinished JSON object a client may send (bytes).
pub const MAX_INPUT: usize = 64 << 10;
/// Clients connected at once.
pub const MAX_CLIENTS: usize = 64;

/// How long [`ControlSocket::close`] lets clients receive the events already sent.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A listening QMP socket; [`ControlSocket::close`] stops it and removes the socket file.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    closing: watch::Sender<bool>,
}

impl ControlSocket {
    /// Binds a new socket at `path` (which must not exist) and accepts clients on the current
    /// runtime. The socket accepts connections when this returns.
    pub async fn bind(control: Control, path: &Path) -> Result<ControlSocket> {
        let listener = UnixListener::bind(path)
            .map_err(Error::io(format!("listening on {}", path.display())))?;
        let closing = watch::channel(false).0;
        let accept = tokio::spawn(accept(control, listener, closing.subscribe()));
        Ok(ControlSocket {
            path: path.to_path_buf(),
            accept,
            closing,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket file; every client gets the events already
    /// sent (`SHUTDOWN` after `quit`) and is disconnected, within a second.
    pub async fn close(self) {
        let _ = std::fs::remove_file(&self.path);
        self.closing.send_replace(true);
        if tokio::time::timeout(CLOSE_GRACE * 2, &mut { self.accept })
            .await
            .is_err()
        {
            tracing::warn!("the QMP socket did not close in time");
        }
    }
}

async fn accept(control: Control, listener: UnixListener, closing: watch::Receiver<bool>) {
    // Dropped with this task: ending the accept loop disconnects every client.
    let mut clients = JoinSet::new();
    let mut closed = closing.clone();
    loop {
        tokio::select! {
            () = until_closed(&mut closed) => {
                drop(listener);
                let all = async { while clients.join_next().await.is_some() {} };
                let _ = tokio::time::timeout(CLOSE_GRACE, all).await;
                return;
            }
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    while clients.try_join_next().is_some() {}
                    if clients.len() >= MAX_CLIENTS {
                        tracing::warn!("too many QMP clients; turning one away");
                        drop(stream);
                        continue;
                    }
                    clients.spawn(serve_client(control.clone(), stream, closing.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a QMP client failed");
                    // EMFILE and the like: let a client go before trying again.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

/// One client's connection (a unix socket; any byte stream for the fuzz target).
struct Client<S> {
    stream: S,
    input: Input,
    negotiated: bool,
    events: Option<broadcast::Receiver<Value>>,
    closing: watch::Receiver<bool>,
}

/// Resolves once the socket is closing.
async fn until_closed(closing: &mut watch::Receiver<bool>) {
    // The sender lives as long as the socket; if it is gone, so is the socket.
    let _ = closing.wait_for(|c| *c).await.map(drop);
}

/// What a client's task woke up for.
enum Woke {
    /// The socket is closing.
    Closing,
    /// This many bytes came in (0: the client hung up).
    Read(usize),
    /// An event to pass on.
    Event(Option<Value>),
}

/// What the parser found at the start of the input.
enum Parsed {
    /// A complete value, and the bytes it took.
    Value(Value, usize),
    /// Not JSON: drop this many bytes.
    Garbage(String, usize),
    /// More bytes are needed.
    Incomplete,
}

fn parse(input: &[u8]) -> Parsed {
    let mut values = serde_json::Deserializer::from_slice(input).into_iter::<Value>();
    match values.next() {
        None => Parsed::Garbage(String::new(), input.len()),
        Some(Ok(v)) => Parsed::Value(v, values.byte_offset()),
        Some(Err(e)) if e.is_eof() => Parsed::Incomplete,
        Some(Err(e)) => {
            // Up to the end of the line the error is on (not of the first line: the bad
            // text may follow the newline that ended the previous command).
            let at = offset_of(input, e.line(), e.column());
            let skip = input[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(input.len(), |p| at + p + 1);
            Parsed::Garbage(format!("JSON parse error, {e}"), skip)
        }
    }
}

/// The byte offset of serde_json's `line` and `column` (both from 1) in `input`, at most its
/// length.
fn offset_of(input: &[u8], line: usize, column: usize) -> usize {
    let line_start = input
        .split_inclusive(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(<[u8]>::len)
        .sum::<usize>();
    (line_start + column.saturating_sub(1)).min(input.len())
}

/// Bytes an unfinished value may grow by between two parses of it.
const PARSE_STEP: usize = 1024;

/// What a client sent that is not taken yet, and what is known of an unfinished value in it.
#[derive(Debug, Default)]
struct Input {
    bytes: Vec<u8>,
    /// Set while `bytes` holds an unfinished value (the last parse needed more).
    pending: Option<Framer>,
}

impl Input {
    /// The next value or garbage at the start of the input, taken off it; `None` when there
    /// is nothing worth parsing (only whitespace, or an unfinished value that cannot have
    /// ended since it was last parsed).
    fn take(&mut self) -> Option<Parsed> {
        if self.bytes.iter().all(u8::is_ascii_whitespace) {
            self.bytes.clear();
            self.pending = None;
            return None;
        }
        if let Some(framer) = &mut self.pending {
            if !framer.worth_parsing(&self.bytes) {
                return None;
            }
        }
        let parsed = parse(&self.bytes);
        match &parsed {
            Parsed::Incomplete => {
                let framer = self.pending.get_or_insert_with(Framer::default);
                framer.parsed(&self.bytes);
            }
            Parsed::Garbage(_, used) | Parsed::Value(_, used) => {
                self.bytes.drain(..*used);
                self.pending = None;
            }
        }
        Some(parsed)
    }
}

/// Follows the brackets and strings of an unfinished value as its bytes come (QEMU's JSON
/// streamer counts them the same way), so that it is parsed again only when it may have
/// ended (its outermost bracket or string closed), has grown by [`PARSE_STEP`] bytes, or a
/// line with text ended (so that a typed mistake is answered at once; after
/// [`FREE_LINE_PARSES`] parses a line must also bring [`LINE_STEP`] bytes). Parsing
/// everything buffered on every read was quadratic: an object of 60 KB sent one byte per read
/// was parsed 60,000 times (19 s of CPU in the fuzz build); now at most a few hundred times.
#[derive(Debug, Default)]
struct Framer {
    /// Bytes of the input looked at.
    scanned: usize,
    /// The input's length at the last parse.
    parsed_at: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Text other than whitespace came since the last parse.
    text: bool,
    /// A reason to parse again came since the last parse.
    due: bool,
    /// Parses of this value so far.
    parses: usize,
}

/// Parses of one unfinished value that any line with text earns.
const FREE_LINE_PARSES: usize = 64;
/// Bytes a line must bring to earn a parse after [`FREE_LINE_PARSES`].
const LINE_STEP: usize = 64;

impl Framer {
    /// Records a parse of `input` that needed more.
    fn parsed(&mut self, input: &[u8]) {
        self.scan(input);
        self.parsed_at = input.len();
        self.due = false;
        self.text = false;
        self.parses += 1;
    }

    /// Whether `input` (the input of the last call, grown at its end) is worth parsing again.
    fn worth_parsing(&mut self, input: &[u8]) -> bool {
        self.scan(input);
        self.due || input.len() >= self.parsed_at + PARSE_STEP
    }

    fn scan(&mut self, input: &[u8]) {
        let from = self.scanned.min(input.len());
        for (at, &b) in input.iter().enumerate().skip(from) {
            self.step(b, at);
        }
        self.scanned = input.len();
    }

    /// Follows byte `b`, at offset `at` of the input.
    fn step(&mut self, b: u8, at: usize) {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => {
                    self.in_string = false;
                    self.due |= self.depth == 0;
                }
                _ => {}
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.due |= self.depth == 0;
            }
            b'\n' => {
                let earned = self.parses < FREE_LINE_PARSES || at >= self.parsed_at + LINE_STEP;
                self.due |= self.text && earned;
            }
            _ => {}
        }
        self.text |= !b.is_ascii_whitespace();
    }
}

/// Serves one connected client on `stream` until it hangs up, breaks the input bound, or the
/// socket closes.
pub(crate) async fn serve_client<S>(control: Control, stream: S, closing: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Client {
        stream,
        input: Input::default(),
        negotiated: false,
        events: None,
        closing,
    };
    if let Err(e) = client.run(&control).await {
        tracing::debug!(error = %e, "QMP client gone");
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, v: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        line.extend_from_slice(b"\r\n");
        self.stream.write_all(&line).await
    }

    async fn run(&mut self, control: &Control) -> std::io::Result<()> {
        self.send(&commands::greeting()).await?;
        let mut buf = vec![0u8; 8192];
        loop {
            while let Some(reply) = self.next_command(control).await {
                let (reply, quit) = reply;
                self.send(&reply).await?;
                if quit {
                    control.request_quit();
                }
            }
            if self.input.bytes.len() > MAX_INPUT {
                let e = ControlError::generic(format!(
                    "JSON input too large (more than {MAX_INPUT} bytes); disconnecting"
                ));
                self.send(&json!({"error": e.to_json()})).await?;
                return Ok(());
            }
            let mut closing = self.closing.clone();
            let woke = tokio::select! {
                () = until_closed(&mut closing) => Woke::Closing,
                n = self.stream.read(&mut buf) => Woke::Read(n?),
                ev = next_event(&mut self.events) => Woke::Event(ev),
            };
            let read = match woke {
                Woke::Closing => return self.send_pending_events().await,
                Woke::Event(ev) => {
                    if let Some(ev) = ev {
                        self.send(&ev).await?;
                    }
                    continue;
                }
                Woke::Read(n) => n,
            };
            if read == 0 {
                return Ok(());
            }
            self.input.bytes.extend_from_slice(&buf[..read]);
        }
    }

    /// Sends the events already broadcast, before the connection closes.
    async fn send_pending_events(&mut self) -> std::io::Result<()> {
        while let Some(Ok(ev)) = self.events.as_mut().map(broadcast::Receiver::try_recv) {
            self.send(&ev).await?;
        }
        Ok(())
    }

    /// Takes the next complete command off the input and runs it: its reply, and whether it
    /// was `quit`. `None` when the input holds no complete command.
    async fn next_command(&mut self, control: &Control) -> Option<(Value, bool)> {
        loop {
            match self.input.take()? {
                Parsed::Incomplete => return None,
                Parsed::Garbage(desc, _) if desc.is_empty() => {}
                Parsed::Garbage(desc, _) => {
                    return Some((
                        json!({"error": ControlError::generic(desc).to_json()}),
                        false,
                    ));
                }
                Parsed::Value(v, _) => return Some(self.command(control, v).await),
            }
        }
    }

    /// Runs one parsed command.
    async fn command(&mut self, control: &Control, v: Value) -> (Value, bool) {
        let id = v.get("id").cloned();
        let reply = |result: Result<Value, ControlError>| {
            let mut r = match result {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"error": e.to_json()}),
            };
            if let Some(id) = &id {
                r["id"] = id.clone();
            }
            r
        };
        let (name, args) = match split_command(&v) {
            Ok(c) => c,
            Err(e) => return (reply(Err(e)), false),
        };
        if name == "qmp_capabilities" {
            if self.negotiated {
                return (
                    reply(Err(ControlError {
                        class: "CommandNotFound",
                        desc: "Capabilities negotiation is already complete, command ignored"
                            .into(),
                    })),
                    false,
                );
            }
            if let Some(enable) = args.get("enable") {
                if enable.as_array().is_none_or(|a| !a.is_empty()) {
                    return (
                        reply(Err(ControlError::generic(
                            "Parameter 'enable': no capabilities are offered",
                        ))),
                        false,
                    );
                }
            }
            self.negotiated = true;
            self.events = Some(control.subscribe_qmp());
            return (reply(Ok(json!({}))), false);
        }
        if !self.negotiated {
            return (
                reply(Err(ControlError {
                    class: "CommandNotFound",
                    desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                })),
                false,
            );
        }
        let result = control.execute(name, &args).await;
        let quit = name == "quit" && result.is_ok();
        (reply(result), quit)
    }
}

/// The command's name and arguments, or why the input is not a command.
fn split_command(v: &Value) -> Result<(&str, Map<String, Value>), ControlError> {
    let Some(obj) = v.as_object() else {
        return Err(ControlError::generic("QMP input must be a JSON object"));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["execute", "arguments", "id"].contains(&k.as_str()))
    {
        return Err(ControlError::generic(format!(
            "QMP input member '{k}' is unexpected"
        )));
    }
    let Some(name) = obj.get("execute").and_then(Value::as_str) else {
        return Err(ControlError::generic(
            "QMP input member 'execute' must be a string",
        ));
    };
    let args = match obj.get("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ControlError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
    };
    Ok((name, args))
}

/// The next event for a negotiated client (never, before negotiation).
async fn next_event(events: &mut Option<broadcast::Receiver<Value>>) -> Option<Value> {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(v) => return Some(v),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(lost = n, "a QMP client fell behind; events lost");
            }
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_takes_objects_one_at_a_time() {
        let input = br#"{"execute": "a"} {"execute": "b"}"#;
        let Parsed::Value(v, used) = parse(input) else {
            panic!("no value")
        };
        assert_eq!(v["execute"], "a");
        let Parsed::Value(v, _) = parse(&input[used..]) else {
            panic!("no second value")
        };
        assert_eq!(v["execute"], "b");
        assert!(matches!(parse(br#"{"execute": "#), Parsed::Incomplete));
        let Parsed::Garbage(desc, skip) = parse(b"}}garbage\n{}") else {
            panic!("garbage accepted")
        };
        assert!(desc.starts_with("JSON parse error"), "{desc}");
        assert_eq!(skip, 10);
    }

    /// Found by `control_json`'s seeds: the bad text of a line after a command was skipped
    /// from the newline that ended the command, so the line was parsed again and answered
    /// with a second error (and a bad line after blank lines with one error per line).
    #[test]
    fn a_bad_line_after_a_command_is_one_error() {
        let input = b"\r\nnot json\r\n{\"execute\": \"b\"}";
        let Parsed::Garbage(desc, skip) = parse(input) else {
            panic!("garbage accepted")
        };
        assert!(desc.contains("line 2"), "{desc}");
        assert_eq!(&input[skip..], b"{\"execute\": \"b\"}");
        let input = b"\n\n\n{\"a\": \n x\n{}";
        let Parsed::Garbage(_, skip) = parse(input) else {
            panic!("garbage accepted")
        };
        assert_eq!(&input[skip..], b"{}");
    }

    /// Sends `text` one byte at a time, taking what is ready after each; the values taken and
    /// the parses of unfinished values.
    fn trickle(text: &[u8]) -> (Vec<Value>, usize) {
        let mut input = Input::default();
        let (mut values, mut parses) = (Vec::new(), 0);
        for &b in text {
            input.bytes.push(b);
            while let Some(p) = input.take() {
                match p {
                    Parsed::Incomplete => break,
                    Parsed::Value(v, _) => values.push(v),
                    Parsed::Garbage(..) => values.push(Value::Null),
                }
            }
            parses = parses.max(input.pending.as_ref().map_or(0, |f| f.parses));
        }
        (values, parses)
    }

    #[test]
    fn a_value_sent_a_byte_at_a_time_is_parsed_a_bounded_number_of_times() {
        let long = "a\\\"}]".repeat(10_000);
        let text = format!(
            r#"{{"execute": "{long}", "arguments": {{"a": [1, {{"b": "}}"}}], "c": {{}}}}}}"#
        );
        let text = format!("{text} [1, 2]\n{text}");
        let (values, parses) = trickle(text.as_bytes());
        assert_eq!(values.len(), 3, "{values:?}");
        assert_eq!(
            values[0]["execute"].as_str().unwrap().len(),
            long.len() - 10_000
        );
        assert_eq!(values[0], values[2]);
        assert_eq!(values[1], serde_json::json!([1, 2]));
        // 60 KB: once per PARSE_STEP bytes, plus a few.
        assert!(parses <= 70, "{parses} parses of one value");
        // A mistake is answered when its line ends.
        let (values, _) = trickle(b"{\"a\":\n x \n{}");
        assert_eq!(values, vec![Value::Null, serde_json::json!({})]);
        // Lines of a valid value that goes on: a parse per line at first, then per LINE_STEP
        // bytes of lines.
        let lines = format!("{{\"a\": [{}1]}}", "1,\n".repeat(20_000));
        let (values, parses) = trickle(lines.as_bytes());
        assert_eq!(values.len(), 1);
        assert!(
            parses <= 64 + 60_000 / 64 + 60,
            "{parses} parses of one value"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse(deep.as_bytes()),
            Parsed::Garbage(..) | Parsed::Incomplete
        ));
    }
}
